//! JSON params -> typed rules. Every problem is collected (not just the first) so a client can fix a request in one
//! round trip; each error names its JSON path.

use super::*;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Message of the error for a missing required field (preset validation ignores these: defaults are partial).
pub const REQUIRED: &str = "is required";

pub const RULE_TYPES: [&str; 4] = ["recolor", "tone", "texture", "remove"];

const FINISHES: [(&str, Finish); 4] = [
    ("matte", Finish::Matte),
    ("eggshell", Finish::Eggshell),
    ("satin", Finish::Satin),
    ("gloss", Finish::Gloss),
];
const MODES: [(&str, RemoveMode); 2] = [("cutout", RemoveMode::Cutout), ("fill", RemoveMode::Fill)];

/// Keys that name the same thing two ways: a request that sets one replaces a preset default for the other.
const EXCLUSIVE: [&str; 2] = ["swatch", "builtin"];

/// Parses and validates `type` + `params` (a JSON object) with preset defaults merged underneath. Unknown keys,
/// wrong types and out-of-range values are reported, ALL of them, each naming its field.
pub fn parse_rule(
    rule_type: &str,
    params: &Map<String, Value>,
    defaults: Option<&Map<String, Value>>,
) -> Result<Rule, Vec<FieldError>> {
    let mut merged = defaults.cloned().unwrap_or_default();
    if EXCLUSIVE.iter().any(|k| params.contains_key(*k)) {
        for k in EXCLUSIVE {
            merged.remove(k);
        }
    }
    for (k, v) in params {
        merged.insert(k.clone(), v.clone());
    }
    let mut r = Reader {
        map: &merged,
        seen: BTreeSet::new(),
        errors: Vec::new(),
    };
    let rule = r.rule(rule_type);
    r.finish();
    match rule {
        Some(rule) if r.errors.is_empty() => Ok(rule),
        _ => Err(r.errors),
    }
}

/// Checks a preset's defaults for one rule type: the same checks as a request, except that required parameters may
/// be missing (the request supplies them). A part missing inside one the preset gives is its error, not the
/// request's: `{"color": {"l": 50}}` (no `a`, `b`) is refused at load, not in every request that relies on it.
pub fn validate_defaults(rule_type: &str, defaults: &Map<String, Value>) -> Vec<FieldError> {
    let nested = |field: &str| field.matches('.').count() > 1;
    match parse_rule(rule_type, &Map::new(), Some(defaults)) {
        Ok(_) => Vec::new(),
        Err(errs) => errs
            .into_iter()
            .filter(|e| e.message != REQUIRED || nested(&e.field))
            .collect(),
    }
}

/// What a texture's `perspective` parameter gave.
enum Planes {
    Flat,
    Every([[f32; 2]; 4]),
    ByImage(BTreeMap<u32, [[f32; 2]; 4]>),
}

struct Reader<'a> {
    map: &'a Map<String, Value>,
    seen: BTreeSet<&'static str>,
    errors: Vec<FieldError>,
}

impl Reader<'_> {
    fn rule(&mut self, rule_type: &str) -> Option<Rule> {
        let common = self.common();
        match rule_type {
            "recolor" => {
                let lab = self.color();
                let finish = self.choice("finish", &FINISHES, Some(Finish::Eggshell));
                Some(Rule::Recolor(RecolorParams {
                    common,
                    lab: lab?,
                    finish: finish?,
                }))
            }
            "tone" => {
                // Read every field before any `?` so all of their errors are reported.
                let v: Vec<Option<f32>> = ["brightness", "contrast", "saturation", "warmth"]
                    .into_iter()
                    .map(|k| self.num(k, -1.0, 1.0, Some(0.0)))
                    .collect();
                Some(Rule::Tone(ToneParams {
                    common,
                    brightness: v[0]?,
                    contrast: v[1]?,
                    saturation: v[2]?,
                    warmth: v[3]?,
                }))
            }
            "texture" => {
                let source = self.swatch_source();
                let scale = self.num("scale", 0.05, 20.0, Some(1.0));
                let rotation_deg = self.num("rotation", -360.0, 360.0, Some(0.0));
                let opacity = self.num("opacity", 0.0, 1.0, Some(1.0));
                let planes = self.perspective("perspective");
                let aspect = self.num("perspective_aspect", 0.05, 20.0, Some(1.0));
                // Every field is read above, so each error is already reported when a `?` returns.
                let (perspective, perspective_by_image) = match (planes?, aspect?) {
                    (Planes::Flat, _) => (None, BTreeMap::new()),
                    (Planes::Every(corners), aspect) => {
                        (Some(Perspective { corners, aspect }), BTreeMap::new())
                    }
                    (Planes::ByImage(by_image), aspect) => (
                        None,
                        by_image
                            .into_iter()
                            .map(|(i, corners)| (i, Perspective { corners, aspect }))
                            .collect(),
                    ),
                };
                Some(Rule::Texture(TextureParams {
                    common,
                    source: source?,
                    scale: scale?,
                    rotation_deg: rotation_deg?,
                    opacity: opacity?,
                    perspective,
                    perspective_by_image,
                }))
            }
            "remove" => {
                let mode = self.choice("mode", &MODES, Some(RemoveMode::Cutout));
                Some(Rule::Remove(RemoveParams {
                    common,
                    mode: mode?,
                }))
            }
            other => {
                self.errors.push(FieldError::new(
                    "type",
                    format!(
                        "unknown rule type {other:?}; expected one of {}",
                        RULE_TYPES.join(", ")
                    ),
                ));
                None
            }
        }
    }

    fn common(&mut self) -> Common {
        Common {
            feather: self.num("feather", 0.0, 200.0, Some(1.0)).unwrap_or(1.0),
            grow: self.num("grow", -200.0, 200.0, Some(0.0)).unwrap_or(0.0),
            refine: self.boolean("refine", true).unwrap_or(true),
            occluded_by: self.string_list("occluded_by"),
            strength: self.num("strength", 0.0, 1.0, Some(1.0)).unwrap_or(1.0),
        }
    }

    fn get(&mut self, key: &'static str) -> Option<&Value> {
        self.seen.insert(key);
        self.map.get(key)
    }

    fn err(&mut self, key: &str, msg: impl Into<String>) {
        self.errors
            .push(FieldError::new(format!("params.{key}"), msg));
    }

    fn num(&mut self, key: &'static str, lo: f64, hi: f64, default: Option<f32>) -> Option<f32> {
        match self.get(key).cloned() {
            None => {
                if default.is_none() {
                    self.err(key, REQUIRED);
                }
                default
            }
            Some(v) => match v.as_f64() {
                Some(x) if (lo..=hi).contains(&x) => Some(x as f32),
                Some(x) => {
                    self.err(key, format!("must be between {lo} and {hi}, got {x}"));
                    None
                }
                None => {
                    self.err(key, format!("expected a number, got {v}"));
                    None
                }
            },
        }
    }

    fn boolean(&mut self, key: &'static str, default: bool) -> Option<bool> {
        match self.get(key).cloned() {
            None => Some(default),
            Some(Value::Bool(b)) => Some(b),
            Some(v) => {
                self.err(key, format!("expected true or false, got {v}"));
                None
            }
        }
    }

    fn choice<T: Copy>(
        &mut self,
        key: &'static str,
        opts: &[(&str, T)],
        default: Option<T>,
    ) -> Option<T> {
        let names = || opts.iter().map(|o| o.0).collect::<Vec<_>>().join(", ");
        match self.get(key).cloned() {
            None => {
                if default.is_none() {
                    self.err(key, REQUIRED);
                }
                default
            }
            Some(Value::String(s)) => match opts.iter().find(|o| o.0 == s) {
                Some(o) => Some(o.1),
                None => {
                    self.err(
                        key,
                        format!("unknown value {s:?}; expected one of {}", names()),
                    );
                    None
                }
            },
            Some(v) => {
                self.err(
                    key,
                    format!("expected a string (one of {}), got {v}", names()),
                );
                None
            }
        }
    }

    fn string_list(&mut self, key: &'static str) -> Option<Vec<String>> {
        let v = self.get(key).cloned()?;
        let items = match v {
            Value::Array(items) => items,
            v => {
                self.err(key, format!("expected a list of concept names, got {v}"));
                return None;
            }
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item.as_str() {
                Some(s) if !s.trim().is_empty() => out.push(s.to_string()),
                _ => self.errors.push(FieldError::new(
                    format!("params.{key}[{i}]"),
                    format!("expected a non-empty string, got {item}"),
                )),
            }
        }
        Some(out)
    }

    fn color(&mut self) -> Option<[f32; 3]> {
        match self.get("color").cloned() {
            None => {
                self.err("color", REQUIRED);
                None
            }
            Some(Value::String(s)) => match parse_hex(&s) {
                Some(rgb) => Some(crate::color::srgb8_to_lab(rgb)),
                None => {
                    self.err(
                        "color",
                        format!("expected \"#RRGGBB\" or \"#RGB\", got {s:?}"),
                    );
                    None
                }
            },
            Some(Value::Object(o)) => self.lab_object(&o),
            Some(v) => {
                self.err(
                    "color",
                    format!("expected a hex string or a Lab object {{l, a, b}}, got {v}"),
                );
                None
            }
        }
    }

    fn lab_object(&mut self, o: &Map<String, Value>) -> Option<[f32; 3]> {
        let mut lab = [0.0f32; 3];
        let mut ok = true;
        for (i, (k, lo, hi)) in [
            ("l", 0.0, 100.0),
            ("a", -128.0, 127.0),
            ("b", -128.0, 127.0),
        ]
        .iter()
        .enumerate()
        {
            let field = format!("params.color.{k}");
            match o.get(*k).map(|v| (v, v.as_f64())) {
                None => self.errors.push(FieldError::new(field, REQUIRED)),
                Some((_, Some(x))) if (*lo..=*hi).contains(&x) => {
                    lab[i] = x as f32;
                    continue;
                }
                Some((_, Some(x))) => self.errors.push(FieldError::new(
                    field,
                    format!("must be between {lo} and {hi}, got {x}"),
                )),
                Some((v, None)) => self.errors.push(FieldError::new(
                    field,
                    format!("expected a number, got {v}"),
                )),
            }
            ok = false;
        }
        for k in o.keys().filter(|k| !["l", "a", "b"].contains(&k.as_str())) {
            self.errors.push(FieldError::new(
                format!("params.color.{k}"),
                "unknown field",
            ));
            ok = false;
        }
        ok.then_some(lab)
    }

    /// `perspective`: one rectangle for every image (a list of four corners), or one per image (an object whose
    /// keys are image indices). None after an error.
    fn perspective(&mut self, key: &'static str) -> Option<Planes> {
        let Some(v) = self.get(key).cloned() else {
            return Some(Planes::Flat);
        };
        let Value::Object(per_image) = v else {
            return self
                .corners(&format!("params.{key}"), &v)
                .map(Planes::Every);
        };
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (idx, corners) in &per_image {
            let field = format!("params.{key}.{idx}");
            match idx.parse::<u32>() {
                Ok(i) if i.to_string() == *idx => match self.corners(&field, corners) {
                    Some(c) => {
                        out.insert(i, c);
                    }
                    None => ok = false,
                },
                _ => {
                    self.errors.push(FieldError::new(
                        field,
                        "keys of a per-image perspective are image indices (0, 1, ...)",
                    ));
                    ok = false;
                }
            }
        }
        ok.then_some(Planes::ByImage(out))
    }

    /// Four [x, y] points in 0..1 forming a convex quadrilateral listed clockwise on screen (y down); None after
    /// an error (reported under `field`).
    fn corners(&mut self, field: &str, v: &Value) -> Option<[[f32; 2]; 4]> {
        const SHAPE: &str = "expected four [x, y] corners (fractions of the photo's width and height, 0..1): \
                             far-left, far-right, near-right, near-left";
        let mut fail = |msg: String| {
            self.errors.push(FieldError::new(field, msg));
            None
        };
        let points: Option<Vec<[f64; 2]>> = v.as_array().filter(|a| a.len() == 4).and_then(|a| {
            a.iter()
                .map(|p| match p.as_array().map(|xy| xy.as_slice()) {
                    Some([x, y]) => Some([x.as_f64()?, y.as_f64()?]),
                    _ => None,
                })
                .collect()
        });
        let Some(points) = points else {
            return fail(format!("{SHAPE}; got {v}"));
        };
        if points.iter().flatten().any(|c| !(0.0..=1.0).contains(c)) {
            return fail(format!("corners must lie inside the photo (0..1); got {v}"));
        }
        // Clockwise on screen (y down) means every turn has a positive cross product; a zero one is degenerate.
        let turns_right = (0..4).all(|i| {
            let [a, b, c] = [points[i], points[(i + 1) % 4], points[(i + 2) % 4]];
            (b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0]) > 1e-6
        });
        if !turns_right {
            return fail(format!(
                "the corners must form a convex quadrilateral listed clockwise on screen (far-left, far-right, \
                 near-right, near-left); got {v}"
            ));
        }
        Some(std::array::from_fn(|i| points[i].map(|c| c as f32)))
    }

    fn swatch_source(&mut self) -> Option<SwatchSource> {
        let key = self.get("swatch").cloned();
        let builtin = self.get("builtin").cloned();
        match (key, builtin) {
            (Some(_), Some(_)) => {
                self.err(
                    "swatch",
                    "give either swatch (an object key) or builtin, not both",
                );
                None
            }
            (None, None) => {
                self.err("swatch", REQUIRED);
                None
            }
            (Some(Value::String(k)), None) if !k.trim().is_empty() => Some(SwatchSource::Key(k)),
            (Some(v), None) => {
                self.err(
                    "swatch",
                    format!("expected a non-empty object key, got {v}"),
                );
                None
            }
            (None, Some(_)) => self
                .choice("builtin", &Builtin::ALL, None)
                .map(SwatchSource::Builtin),
        }
    }

    fn finish(&mut self) {
        for k in self.map.keys() {
            if !self.seen.contains(k.as_str()) {
                self.errors
                    .push(FieldError::new(format!("params.{k}"), "unknown field"));
            }
        }
    }
}

/// "#RRGGBB" or "#RGB" (the leading # optional, case-insensitive).
pub fn parse_hex(s: &str) -> Option<[u8; 3]> {
    let h = s.trim().strip_prefix('#').unwrap_or(s.trim());
    if !h.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let v = u32::from_str_radix(h, 16).ok()?;
    match h.len() {
        6 => Some([(v >> 16) as u8, (v >> 8) as u8, v as u8]),
        3 => {
            let d = |n: u32| ((n & 0xf) * 17) as u8;
            Some([d(v >> 8), d(v >> 4), d(v)])
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn reports_every_bad_field_by_path() {
        let p = obj(
            json!({"color": "#12", "strength": 2, "finish": "shiny", "feather": "x", "bogus": 1,
                          "occluded_by": ["sofa", 3]}),
        );
        let errs = parse_rule("recolor", &p, None).unwrap_err();
        let fields: BTreeSet<_> = errs.iter().map(|e| e.field.as_str()).collect();
        let want = [
            "params.color",
            "params.strength",
            "params.finish",
            "params.feather",
            "params.bogus",
            "params.occluded_by[1]",
        ];
        assert_eq!(fields, want.into_iter().collect(), "{errs:?}");
    }

    #[test]
    fn parses_hex_lab_and_defaults() {
        let r = parse_rule("recolor", &obj(json!({"color": "#fff"})), None).unwrap();
        let Rule::Recolor(p) = &r else { panic!() };
        assert!((p.lab[0] - 100.0).abs() < 0.1);
        assert_eq!(p.finish, Finish::Eggshell);
        assert_eq!(r.region_params(), crate::RegionParams::default());
        let lab = obj(json!({"color": {"l": 40, "a": 10, "b": -20, "c": 1}}));
        let errs = parse_rule("recolor", &lab, None).unwrap_err();
        assert_eq!(
            errs,
            vec![FieldError::new("params.color.c", "unknown field")]
        );
        let defaults = obj(json!({"finish": "matte", "feather": 3}));
        let r = parse_rule(
            "recolor",
            &obj(json!({"color": {"l": 40, "a": 10, "b": -20}})),
            Some(&defaults),
        )
        .unwrap();
        let Rule::Recolor(p) = r else { panic!() };
        assert_eq!(
            (p.finish, p.common.feather, p.lab),
            (Finish::Matte, 3.0, [40.0, 10.0, -20.0])
        );
    }

    #[test]
    fn texture_source_and_other_types() {
        let d = obj(json!({"builtin": "linen"}));
        let r = parse_rule("texture", &obj(json!({"swatch": "u/1/sw.png"})), Some(&d)).unwrap();
        assert_eq!(r.texture_key(), Some("u/1/sw.png"));
        let r = parse_rule("texture", &Map::new(), Some(&d)).unwrap();
        assert_eq!(r.texture_key(), None);
        assert!(parse_rule("texture", &Map::new(), None).is_err());
        let r = parse_rule(
            "remove",
            &obj(json!({"mode": "cutout", "occluded_by": []})),
            None,
        )
        .unwrap();
        assert!(r.output_has_alpha() && r.occluded_by() == Some(&[][..]));
        assert_eq!(
            parse_rule("blur", &Map::new(), None).unwrap_err()[0].field,
            "type"
        );
        assert!(validate_defaults("recolor", &obj(json!({"finish": "satin"}))).is_empty());
        assert_eq!(
            validate_defaults("tone", &obj(json!({"warmth": 5}))).len(),
            1
        );
        // A Lab colour given in part: its missing parts are the preset's error.
        let partial = validate_defaults("recolor", &obj(json!({"color": {"l": 50}})));
        let fields: Vec<&str> = partial.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["params.color.a", "params.color.b"]);
    }
}
