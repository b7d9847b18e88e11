//! Whether a rule's region edits anything, and why not (`RuleOutput.not_applied_reason`).

use palette_rules::GrayImage;
use palette_rules::rule::Rule;

/// Why a rule left a photo as it was (`RuleOutput.not_applied_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotApplied {
    /// The segmenter found no instance of the rule's concept in the photo.
    ConceptNotFound,
    /// Instances were found, but nothing of them is left in the rule's region: occluders in front cover (nearly)
    /// all of them, or a negative `grow` wider than they are took them all.
    RegionEmpty,
    /// A fill (remove in `fill` mode) whose region covers the whole photo: nothing around it to fill from.
    NothingToFillFrom,
}

impl NotApplied {
    pub fn as_str(self) -> &'static str {
        match self {
            NotApplied::ConceptNotFound => "concept_not_found",
            NotApplied::RegionEmpty => "region_empty",
            NotApplied::NothingToFillFrom => "nothing_to_fill_from",
        }
    }

    /// Why `rule` leaves the photo as it was on a region that is not empty, if it does: a fill over the whole photo
    /// (its output is then the photo, as `palette_rules::inpaint` leaves it). Asked per rule, not per region: rules
    /// of different types share a region.
    pub fn by_rule(rule: &Rule, region: &GrayImage) -> Option<NotApplied> {
        (rule.fills_from_surroundings() && !palette_rules::inpaint::has_fill_source(region))
            .then_some(NotApplied::NothingToFillFrom)
    }
}

/// Why a rule's region edits nothing, if it does not: no instance of its concept (`target` None), occluders hiding
/// it (the region is then cleared: soft edges leave a faint rim where an occluder's edge meets the target's, not an
/// edit anyone asked for), or nothing left of it (a negative `grow` wider than the instances: it was reported
/// applied, with the photo unchanged).
pub fn region_not_applied<O>(
    target: Option<&GrayImage>,
    occluders: &[O],
    region: &mut GrayImage,
) -> Option<NotApplied> {
    match target {
        None => Some(NotApplied::ConceptNotFound),
        Some(t) if hidden_by_occluders(t, occluders, region) => {
            region.fill(0);
            Some(NotApplied::RegionEmpty)
        }
        Some(_) if is_blank(region) => Some(NotApplied::RegionEmpty),
        Some(_) => None,
    }
}

/// No pixel of the plane set. A region that has one stops the walk in its box's first rows; 4 KB chunks OR-ed
/// vectorise where a per-byte early exit does not.
fn is_blank(img: &GrayImage) -> bool {
    img.as_raw()
        .chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &a| acc | a) == 0)
}

/// Whether the occluders leave less than 2 % of the target's mask (by alpha) in the rule's region: soft edges keep a
/// rim where an occluder's edge meets the target's (1.5 % of a 64x48 photo's half, measured), so not exactly 0.
/// Without occluders in the photo, never (and no two full-frame sums: 1.5 % of a 12 MP photo's time, perf).
fn hidden_by_occluders<O>(target: &GrayImage, occluders: &[O], region: &GrayImage) -> bool {
    !occluders.is_empty() && alpha_sum(region) * 50 < alpha_sum(target)
}

/// The sum of a plane's values. Summed in u32 over chunks that cannot overflow it (64 Ki x 255 < 2^32), then in
/// u64: u32 lanes vectorise twice as wide as u64 ones (two such sums per rule, over full 12 MP planes).
fn alpha_sum(img: &GrayImage) -> u64 {
    img.as_raw()
        .chunks(1 << 16)
        .map(|c| u64::from(c.iter().map(|&a| u32::from(a)).sum::<u32>()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_occluders_can_hide_a_target() {
        // A region that kept 1 % of its target: hidden when occluders were cut out of it, not when there were none
        // (then it is the target refined, and `region_empty` would blame occluders that do not exist).
        let target = GrayImage::from_pixel(10, 10, image::Luma([255]));
        let region = GrayImage::from_fn(10, 10, |x, _| image::Luma([if x == 0 { 25 } else { 0 }]));
        let occluder = GrayImage::from_pixel(10, 10, image::Luma([255]));
        assert!(hidden_by_occluders(&target, &[occluder], &region));
        assert!(!hidden_by_occluders::<GrayImage>(&target, &[], &region));
    }

    #[test]
    fn a_region_with_nothing_left_of_its_target_edits_nothing_and_says_so() {
        let target = GrayImage::from_pixel(100, 100, image::Luma([255]));
        let none: [GrayImage; 0] = [];
        // A negative grow wider than the instance: no occluder, nothing left.
        let mut gone = GrayImage::new(100, 100);
        assert_eq!(
            region_not_applied(Some(&target), &none, &mut gone),
            Some(NotApplied::RegionEmpty)
        );
        // One pixel left, in the last chunk: applied.
        let mut kept = GrayImage::new(100, 100);
        kept.put_pixel(99, 99, image::Luma([1]));
        assert_eq!(region_not_applied(Some(&target), &none, &mut kept), None);
        assert_eq!(
            region_not_applied(None, &none, &mut kept),
            Some(NotApplied::ConceptNotFound)
        );
    }

    #[test]
    fn alpha_sums_over_many_chunks_equal_the_plain_sum() {
        // 300x300 = 90000 values: one full 64 Ki chunk (of 255s: just under u32::MAX) and a partial one.
        let img = GrayImage::from_fn(300, 300, |x, y| {
            image::Luma([((x * 7 + y * 13) % 256) as u8])
        });
        let plain: u64 = img.iter().map(|&a| u64::from(a)).sum();
        assert_eq!(alpha_sum(&img), plain);
        let full = GrayImage::from_pixel(300, 300, image::Luma([255]));
        assert_eq!(alpha_sum(&full), 255 * 90_000);
    }
}
