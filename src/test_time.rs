//! Helpers for property tests of expiry rules.

/// Picks a time a few units (`delta`) around `edge` when `exact` is set, or
/// else `anywhere`, so that random cases often land on an expiry boundary.
pub(crate) fn near_edge(edge: u64, delta: i64, anywhere: u64, exact: bool) -> u64 {
    if exact {
        edge.saturating_add_signed(delta)
    } else {
        anywhere
    }
}
