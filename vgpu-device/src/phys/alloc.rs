//! A first-fit range allocator with page granularity, used for local memory and both halves of
//! graphics memory.

use std::collections::BTreeMap;

use vgpu_abi::PAGE_SIZE;

/// Why an allocator rejected a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// The bounds are unaligned or empty.
    #[error("Invalid allocator bounds [{start:#x}, {end:#x})")]
    InvalidBounds {
        /// First address.
        start: u64,
        /// One past the last address.
        end: u64,
    },
    /// The range (or part of it) is already free.
    #[error("Double free of [{start:#x}, +{size:#x})")]
    DoubleFree {
        /// First address.
        start: u64,
        /// Size in bytes.
        size: u64,
    },
    /// The range is not exactly one allocation.
    #[error("Range [{start:#x}, +{size:#x}) was not allocated")]
    NotAllocated {
        /// First address.
        start: u64,
        /// Size in bytes.
        size: u64,
    },
}

/// Hands out page-aligned ranges of `[start, end)`, first fit. Sizes are rounded up to whole
/// pages. Frees must name exactly one earlier allocation; free neighbours are coalesced.
#[derive(Clone, Debug)]
pub struct RangeAllocator {
    start: u64,
    end: u64,
    /// Free extents, start -> size; never adjacent (always coalesced), never empty.
    free: BTreeMap<u64, u64>,
    /// Live allocations, start -> size.
    used: BTreeMap<u64, u64>,
}

/// `size` rounded up to whole pages; `None` for zero or on overflow.
fn page_round(size: u64) -> Option<u64> {
    if size == 0 {
        return None;
    }
    size.checked_add(PAGE_SIZE - 1)
        .map(|s| s & !(PAGE_SIZE - 1))
}

impl RangeAllocator {
    /// An allocator over `[start, end)`; both bounds must be page aligned and `start < end`.
    pub fn new(start: u64, end: u64) -> Result<Self, AllocError> {
        if start >= end || !start.is_multiple_of(PAGE_SIZE) || !end.is_multiple_of(PAGE_SIZE) {
            return Err(AllocError::InvalidBounds { start, end });
        }
        Ok(RangeAllocator {
            start,
            end,
            free: BTreeMap::from([(start, end - start)]),
            used: BTreeMap::new(),
        })
    }

    /// First address managed.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the last address managed.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Allocates `size` bytes (rounded up to pages) at the lowest free address that fits.
    pub fn alloc(&mut self, size: u64) -> Option<u64> {
        let size = page_round(size)?;
        let (&at, &len) = self.free.iter().find(|(_, &len)| len >= size)?;
        self.free.remove(&at);
        if len > size {
            self.free.insert(at + size, len - size);
        }
        self.used.insert(at, size);
        Some(at)
    }

    /// Allocates exactly `[start, start + size)` (`size` rounded up to pages), if it is free.
    pub fn alloc_at(&mut self, start: u64, size: u64) -> Option<u64> {
        let size = page_round(size)?;
        if !start.is_multiple_of(vgpu_abi::PAGE_SIZE) {
            return None;
        }
        let end = start.checked_add(size)?;
        let (&at, &len) = self.free.range(..=start).next_back()?;
        if at + len < end {
            return None;
        }
        self.free.remove(&at);
        if start > at {
            self.free.insert(at, start - at);
        }
        if at + len > end {
            self.free.insert(end, at + len - end);
        }
        self.used.insert(start, size);
        Some(start)
    }

    /// Frees the allocation `[start, start + size)` (`size` rounded up to pages as in
    /// [`RangeAllocator::alloc`]).
    pub fn free(&mut self, start: u64, size: u64) -> Result<(), AllocError> {
        let rounded = page_round(size).ok_or(AllocError::NotAllocated { start, size })?;
        if self.used.get(&start) != Some(&rounded) {
            let end = start.saturating_add(rounded);
            let overlaps_free = self
                .free
                .range(..end)
                .next_back()
                .is_some_and(|(&s, &l)| s + l > start);
            return Err(if overlaps_free {
                AllocError::DoubleFree { start, size }
            } else {
                AllocError::NotAllocated { start, size }
            });
        }
        self.used.remove(&start);
        let mut at = start;
        let mut len = rounded;
        if let Some((&prev, &plen)) = self.free.range(..start).next_back() {
            if prev + plen == start {
                self.free.remove(&prev);
                at = prev;
                len += plen;
            }
        }
        if let Some(next_len) = self.free.remove(&(start + rounded)) {
            len += next_len;
        }
        self.free.insert(at, len);
        Ok(())
    }

    /// Bytes not allocated.
    pub fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }

    /// Bytes allocated.
    pub fn used_bytes(&self) -> u64 {
        self.end - self.start - self.free_bytes()
    }

    /// Size of the largest free extent.
    pub fn largest_free(&self) -> u64 {
        self.free.values().copied().max().unwrap_or(0)
    }

    /// How many more allocations of `size` would succeed in a row. First fit carves repeated
    /// equal requests from the front of each extent in turn, so this is the sum over the free
    /// extents of `extent / size`.
    pub fn count_fit(&self, size: u64) -> u64 {
        match page_round(size) {
            Some(size) => self.free.values().map(|len| len / size).sum(),
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn test_alloc_at_takes_exact_range_or_fails() {
        let mut a = RangeAllocator::new(0, 16 * 4096).unwrap();
        assert_eq!(a.alloc_at(4 * 4096, 2 * 4096), Some(4 * 4096));
        assert_eq!(a.alloc_at(5 * 4096, 4096), None, "taken");
        assert_eq!(a.alloc_at(15 * 4096, 2 * 4096), None, "past the end");
        assert_eq!(a.alloc_at(100, 4096), None, "unaligned");
        assert_eq!(a.alloc(4 * 4096), Some(0));
        assert_eq!(a.alloc(4096), Some(6 * 4096));
        a.free(4 * 4096, 2 * 4096).unwrap();
        assert_eq!(a.count_fit(2 * 4096), 5);
    }

    use proptest::prelude::*;

    use super::*;

    const P: u64 = PAGE_SIZE;

    #[test]
    fn test_alloc_first_fit_lowest_address() {
        let mut a = RangeAllocator::new(0, 16 * P).unwrap();
        assert_eq!(a.alloc(2 * P), Some(0));
        assert_eq!(a.alloc(1), Some(2 * P), "sizes round up to a page");
        assert_eq!(a.alloc(3 * P), Some(3 * P));
        a.free(0, 2 * P).unwrap();
        assert_eq!(a.alloc(P), Some(0), "first fit reuses the hole");
        assert_eq!(a.alloc(4 * P), Some(6 * P), "a hole too small is skipped");
        assert_eq!(a.alloc(0), None);
        assert_eq!(a.alloc(u64::MAX), None);
    }

    #[test]
    fn test_free_neighbours_coalesce_to_one_extent() {
        let mut a = RangeAllocator::new(P, 9 * P).unwrap();
        let r: Vec<u64> = (0..4).map(|_| a.alloc(2 * P).unwrap()).collect();
        assert_eq!(a.alloc(P), None);
        a.free(r[1], 2 * P).unwrap();
        a.free(r[3], 2 * P).unwrap();
        assert_eq!(a.largest_free(), 2 * P);
        a.free(r[2], 2 * P).unwrap();
        assert_eq!(a.largest_free(), 6 * P);
        a.free(r[0], 2 * P).unwrap();
        assert_eq!(a.largest_free(), 8 * P);
        assert_eq!(a.free_bytes(), 8 * P);
        assert_eq!(a.free.len(), 1);
    }

    #[test]
    fn test_free_bad_ranges_rejected() {
        let mut a = RangeAllocator::new(0, 8 * P).unwrap();
        let x = a.alloc(2 * P).unwrap();
        let y = a.alloc(2 * P).unwrap();
        assert_eq!(
            a.free(x, P),
            Err(AllocError::NotAllocated { start: x, size: P })
        );
        assert_eq!(
            a.free(x + P, 2 * P),
            Err(AllocError::NotAllocated {
                start: x + P,
                size: 2 * P
            })
        );
        assert_eq!(
            a.free(6 * P, P),
            Err(AllocError::DoubleFree {
                start: 6 * P,
                size: P
            })
        );
        assert_eq!(
            a.free(x, 0),
            Err(AllocError::NotAllocated { start: x, size: 0 })
        );
        a.free(y, 2 * P).unwrap();
        assert_eq!(
            a.free(y, 2 * P),
            Err(AllocError::DoubleFree {
                start: y,
                size: 2 * P
            })
        );
        assert_eq!(
            a.free(u64::MAX - 1, P),
            Err(AllocError::NotAllocated {
                start: u64::MAX - 1,
                size: P
            })
        );
        assert_eq!(a.used_bytes(), 2 * P);
    }

    #[test]
    fn test_new_bad_bounds_rejected() {
        assert!(RangeAllocator::new(0, 0).is_err());
        assert!(RangeAllocator::new(1, 8 * P).is_err());
        assert!(RangeAllocator::new(0, 8 * P + 1).is_err());
        assert!(RangeAllocator::new(8 * P, 0).is_err());
    }

    #[test]
    fn test_count_fit_fragmented_sums_extents() {
        let mut a = RangeAllocator::new(0, 10 * P).unwrap();
        let r: Vec<u64> = (0..10).map(|_| a.alloc(P).unwrap()).collect();
        for i in [0, 1, 2, 4, 5, 7, 8, 9] {
            a.free(r[i], P).unwrap();
        }
        assert_eq!(a.count_fit(2 * P), 1 + 1 + 1);
        assert_eq!(a.count_fit(3 * P), 2);
        assert_eq!(a.count_fit(P), 8);
        assert_eq!(a.count_fit(0), 0);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Alloc(u64),
        Free(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..=12).prop_map(|p| Op::Alloc(p * P - 7)),
            any::<usize>().prop_map(Op::Free)
        ]
    }

    proptest! {
        #[test]
        fn test_alloc_random_ops_no_overlap_and_count_fit_exact(
            ops in proptest::collection::vec(op(), 1..80),
            probe in 1u64..=8,
        ) {
            let mut a = RangeAllocator::new(4 * P, 68 * P).unwrap();
            let mut live: Vec<(u64, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(size) => {
                        if let Some(s) = a.alloc(size) {
                            live.push((s, page_round(size).unwrap()));
                        } else {
                            prop_assert!(a.largest_free() < page_round(size).unwrap());
                        }
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let (s, l) = live.swap_remove(i % live.len());
                        prop_assert_eq!(a.free(s, l), Ok(()));
                        prop_assert!(a.free(s, l).is_err());
                    }
                    Op::Free(_) => {}
                }
                let mut sorted = live.clone();
                sorted.sort_unstable();
                for w in sorted.windows(2) {
                    prop_assert!(w[0].0 + w[0].1 <= w[1].0, "overlap {:?}", w);
                }
                for &(s, l) in &sorted {
                    prop_assert!(s >= a.start() && s + l <= a.end() && s.is_multiple_of(P));
                }
                let used: u64 = live.iter().map(|r| r.1).sum();
                prop_assert_eq!(a.used_bytes(), used);
            }
            let expect = a.count_fit(probe * P);
            let mut b = a.clone();
            let mut got = 0;
            while b.alloc(probe * P).is_some() {
                got += 1;
            }
            prop_assert_eq!(expect, got);
        }
    }
}
