//! Rules as validated, typed values. Parsing lives in `parse`; the pixel work in `crate::ops`.

mod parse;

pub use parse::{REQUIRED, RULE_TYPES, parse_hex, parse_rule, validate_defaults};

use crate::region::RegionParams;

/// One bad field: `field` is the JSON path inside params, e.g. "params.color".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// Parameters every rule type accepts.
#[derive(Clone, Debug, PartialEq)]
pub struct Common {
    pub feather: f32,
    pub grow: f32,
    pub refine: bool,
    pub occluded_by: Option<Vec<String>>,
    pub strength: f32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Matte,
    Eggshell,
    Satin,
    Gloss,
}

impl Finish {
    /// How much of the light above the wall's lit level the paint shows (an exponent on that light ratio, see
    /// `light::finish_light`): flat paint scatters sheen and hot spots, gloss reflects them. Shadows and fall-off
    /// below the lit level are the light itself and the same on every finish.
    pub fn highlight_gain(self) -> f32 {
        match self {
            Finish::Matte => 0.8,
            Finish::Eggshell => 0.9,
            Finish::Satin => 1.0,
            Finish::Gloss => 1.15,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct RecolorParams {
    pub common: Common,
    /// Target paint colour in CIELAB (D65).
    pub lab: [f32; 3],
    pub finish: Finish,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ToneParams {
    pub common: Common,
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub warmth: f32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    Linen,
    Wood,
    Marble,
    Herringbone,
    Velvet,
}

impl Builtin {
    pub const ALL: [(&'static str, Builtin); 5] = [
        ("linen", Builtin::Linen),
        ("wood", Builtin::Wood),
        ("marble", Builtin::Marble),
        ("herringbone", Builtin::Herringbone),
        ("velvet", Builtin::Velvet),
    ];
}

#[derive(Clone, Debug, PartialEq)]
pub enum SwatchSource {
    /// Object key of an uploaded swatch; the caller loads it and passes it to `apply`.
    Key(String),
    Builtin(Builtin),
}

#[derive(Clone, Debug, PartialEq)]
pub struct TextureParams {
    pub common: Common,
    pub source: SwatchSource,
    /// Tile size relative to the default (one tile = 1/8 of the image's long side).
    pub scale: f32,
    pub rotation_deg: f32,
    pub opacity: f32,
    /// The surface's plane, when the swatch should recede with it (a floor, a wall seen at an angle). This is
    /// what `apply` uses; a per-image `perspective` lands in `perspective_by_image` until `Rule::for_image`.
    pub perspective: Option<Perspective>,
    /// One plane per image index (JSON: `perspective` as an object), for a job of several photos. Images without
    /// an entry are tiled flat.
    pub perspective_by_image: std::collections::BTreeMap<u32, Perspective>,
}

/// A rectangle lying on the surface, as it appears in the photo: its corners far-left, far-right, near-right,
/// near-left (clockwise on screen), as fractions of the upright photo's width and height. Its real width / height
/// is `aspect`; tiles keep their flat size along its near edge and shrink toward the far one.
#[derive(Clone, Debug, PartialEq)]
pub struct Perspective {
    pub corners: [[f32; 2]; 4],
    pub aspect: f32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveMode {
    Cutout,
    Fill,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RemoveParams {
    pub common: Common,
    pub mode: RemoveMode,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Rule {
    Recolor(RecolorParams),
    Tone(ToneParams),
    Texture(TextureParams),
    Remove(RemoveParams),
}

impl Rule {
    pub fn common(&self) -> &Common {
        match self {
            Rule::Recolor(p) => &p.common,
            Rule::Tone(p) => &p.common,
            Rule::Texture(p) => &p.common,
            Rule::Remove(p) => &p.common,
        }
    }

    pub fn region_params(&self) -> RegionParams {
        let c = self.common();
        RegionParams {
            feather_px: c.feather,
            grow_px: c.grow,
            refine_edges: c.refine,
            coarse: false,
        }
    }

    /// Whether the rule fills its region from the photo around it (a remove in `fill` mode): it then needs pixels
    /// outside the region (`inpaint::has_fill_source`).
    pub fn fills_from_surroundings(&self) -> bool {
        matches!(
            self,
            Rule::Remove(RemoveParams {
                mode: RemoveMode::Fill,
                ..
            })
        )
    }

    /// The rule's explicit occluder list, overriding the preset's priorities, when given.
    pub fn occluded_by(&self) -> Option<&[String]> {
        self.common().occluded_by.as_deref()
    }

    /// The rule as it applies to image `idx` of a job: a per-image perspective resolved to that image's plane
    /// (or flat tiling when it has none). Other rules are returned as they are.
    pub fn for_image(&self, idx: u32) -> std::borrow::Cow<'_, Rule> {
        match self {
            Rule::Texture(p) if !p.perspective_by_image.is_empty() => {
                std::borrow::Cow::Owned(Rule::Texture(TextureParams {
                    perspective: p.perspective_by_image.get(&idx).cloned(),
                    perspective_by_image: Default::default(),
                    ..p.clone()
                }))
            }
            _ => std::borrow::Cow::Borrowed(self),
        }
    }

    /// Image indices a per-image perspective names (the caller checks them against the job's images).
    pub fn perspective_images(&self) -> Vec<u32> {
        match self {
            Rule::Texture(p) => p.perspective_by_image.keys().copied().collect(),
            _ => Vec::new(),
        }
    }

    /// The swatch object key the caller must load, for texture rules that name one.
    pub fn texture_key(&self) -> Option<&str> {
        match self {
            Rule::Texture(TextureParams {
                source: SwatchSource::Key(k),
                ..
            }) => Some(k),
            _ => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Rule::Recolor(_) => "recolor",
            Rule::Tone(_) => "tone",
            Rule::Texture(_) => "texture",
            Rule::Remove(_) => "remove",
        }
    }

    /// True when `apply` returns RGBA (a cut-out); callers then must encode PNG/WebP, not JPEG.
    pub fn output_has_alpha(&self) -> bool {
        matches!(
            self,
            Rule::Remove(RemoveParams {
                mode: RemoveMode::Cutout,
                ..
            })
        )
    }
}
