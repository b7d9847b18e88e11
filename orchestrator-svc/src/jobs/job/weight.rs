//! What a job weighs in memory, roughly: the registry keeps finished jobs within RETAINED_JOBS_MB by these figures.

use palette_proto::orchestrator::v1::{Item, MaskKey, RuleOutput};

/// Heap bytes of a job record outside its items: the handle, its event ring, the plan's fixed parts.
pub(super) const JOB_OVERHEAD_BYTES: usize = 4096;

/// What one item's record holds in memory, roughly: the structs and every string's buffer. A finished item is
/// dominated by its mask keys (one per instance: ~23 on the benchmark's photos, up to
/// MAX_INSTANCES_PER_CONCEPT x concepts), which is why the registry weighs jobs instead of counting them.
pub(super) fn approx_item_bytes(item: &Item) -> usize {
    use std::mem::size_of;
    // Allocators round small allocations up; 16 bytes per string is about what glibc adds.
    let text = |s: &String| {
        if s.capacity() == 0 {
            0
        } else {
            s.capacity() + 16
        }
    };
    size_of::<Item>()
        + text(&item.input_key)
        + text(&item.output_key)
        + text(&item.preview_key)
        + text(&item.error)
        + text(&item.error_code)
        + text(&item.callback_error)
        + item.outputs.capacity() * size_of::<RuleOutput>()
        + item
            .outputs
            .iter()
            .map(|o| text(&o.rule_id) + text(&o.output_key) + text(&o.not_applied_reason))
            .sum::<usize>()
        + item.masks.capacity() * size_of::<MaskKey>()
        + item
            .masks
            .iter()
            .map(|m| text(&m.concept) + text(&m.key))
            .sum::<usize>()
}
