//! The agent's global allocator. dlmalloc packs small blocks tightly, but a page it has touched
//! stays resident for good (it gives memory back only from the top of its heap, past 2 MiB):
//! the buffers a burst of commands grows, then frees or moves, would hold the agent's memory at
//! the burst's peak. So a block of a page or more gets pages of its own from the kernel (mmap),
//! which go back to it the moment the block is freed; only smaller blocks come from dlmalloc.
//! `bench/soak` measures the difference.
//!
//! The one exception: the last freed block of each size up to `SPARE_PAGES` pages is kept for
//! the next block of that size. A stream of same-sized buffers (rustls hands each TLS record's
//! plaintext over in a new 16 KiB one: ~16,000 for a 256 MiB download) would otherwise cost an
//! mmap, a munmap and their page faults each. At most 1+2+3+4 pages stay resident for that.

use std::alloc::{GlobalAlloc, Layout};
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

pub struct Allocator;

static SMALL: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

const SPARE_PAGES: usize = 4;
/// `SPARES[n - 1]`: a freed block of n pages, or null.
static SPARES: [AtomicPtr<u8>; SPARE_PAGES] = [const { AtomicPtr::new(ptr::null_mut()) }; SPARE_PAGES];

/// The kernel's page size, read once: 4 KiB on most devices, up to 64 KiB on some arm64
/// kernels, where a smaller block on pages of its own would waste most of one.
fn page_size() -> usize {
    static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);
    match PAGE_SIZE.load(Ordering::Relaxed) {
        0 => {
            // SAFETY: sysconf has no preconditions.
            let size = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(0);
            let size = size.max(4096);
            PAGE_SIZE.store(size, Ordering::Relaxed);
            size
        }
        size => size,
    }
}

fn has_own_pages(layout: &Layout) -> bool {
    let page = page_size();
    layout.size() >= page && layout.align() <= page
}

// SAFETY: a block is always freed or resized by the side that made it: the caller passes its
// layout back unchanged (the GlobalAlloc contract), and the layout tells the sides apart. Both
// sides are thread-safe.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if has_own_pages(&layout) {
            take_spare(layout.size()).unwrap_or_else(|| map(layout.size()))
        } else {
            SMALL.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if has_own_pages(&layout) {
            match take_spare(layout.size()) {
                Some(spare) => {
                    ptr::write_bytes(spare, 0, layout.size());
                    spare
                }
                None => map(layout.size()), // the kernel hands out zeroed pages
            }
        } else {
            SMALL.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if has_own_pages(&layout) {
            if !keep_spare(block, layout.size()) {
                libc::munmap(block.cast(), layout.size());
            }
        } else {
            SMALL.dealloc(block, layout)
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        match (has_own_pages(&layout), has_own_pages(&new_layout)) {
            (false, false) => SMALL.realloc(block, layout, new_size),
            (true, true) => remap(block, layout.size(), new_size),
            _ => self.move_block(block, layout, new_layout),
        }
    }
}

impl Allocator {
    /// Resizes a block across the line between the two sides: a new block, a copy, a free.
    unsafe fn move_block(&self, block: *mut u8, layout: Layout, new_layout: Layout) -> *mut u8 {
        let moved = self.alloc(new_layout);
        if !moved.is_null() {
            ptr::copy_nonoverlapping(block, moved, layout.size().min(new_layout.size()));
            self.dealloc(block, layout);
        }
        moved
    }
}

/// The slot for blocks of `size` bytes' pages, if they are kept.
fn spare_slot(size: usize) -> Option<&'static AtomicPtr<u8>> {
    SPARES.get(size.div_ceil(page_size()).checked_sub(1)?)
}

/// A kept block with as many pages as `size` needs.
fn take_spare(size: usize) -> Option<*mut u8> {
    let block = spare_slot(size)?.swap(ptr::null_mut(), Ordering::Acquire);
    (!block.is_null()).then_some(block)
}

/// Keeps a freed block of `size` bytes for the next of its size; false when it is not kept
/// (too big, or one of its size is kept already).
fn keep_spare(block: *mut u8, size: usize) -> bool {
    spare_slot(size).is_some_and(|slot| {
        slot.compare_exchange(ptr::null_mut(), block, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    })
}

unsafe fn map(size: usize) -> *mut u8 {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let block = libc::mmap(ptr::null_mut(), size, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
    if block == libc::MAP_FAILED {
        ptr::null_mut()
    } else {
        block.cast()
    }
}

/// Grows or shrinks a block that has pages of its own: in place when the pages after it are
/// free, else the kernel moves its pages (no copy).
unsafe fn remap(block: *mut u8, size: usize, new_size: usize) -> *mut u8 {
    let moved = libc::mremap(block.cast(), size, new_size, libc::MREMAP_MAYMOVE);
    if moved == libc::MAP_FAILED {
        ptr::null_mut()
    } else {
        moved.cast()
    }
}

/// A buffer that grows in a burst and is drained after it. Emptied, a buffer keeps its
/// capacity until dropped; one that reached a page is better dropped, as its pages then go back
/// to the kernel at once (smaller ones cost little and are reused).
pub trait Drained {
    /// Gives the buffer's memory back if it is empty and holds a page or more.
    fn release_if_empty(&mut self);
}

impl<T> Drained for Vec<T> {
    fn release_if_empty(&mut self) {
        if self.is_empty() && self.capacity() * std::mem::size_of::<T>() >= page_size() {
            *self = Vec::new();
        }
    }
}

impl<T> Drained for std::collections::VecDeque<T> {
    fn release_if_empty(&mut self) {
        if self.is_empty() && self.capacity() * std::mem::size_of::<T>() >= page_size() {
            *self = std::collections::VecDeque::new();
        }
    }
}

impl Drained for bytes::BytesMut {
    fn release_if_empty(&mut self) {
        if self.is_empty() && self.capacity() >= page_size() {
            *self = bytes::BytesMut::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(block: *mut u8, len: usize) {
        for i in 0..len {
            // SAFETY: the test allocated at least `len` bytes at `block`.
            unsafe { *block.add(i) = i as u8 };
        }
    }

    fn holds_pattern(block: *const u8, len: usize) -> bool {
        // SAFETY: the test allocated at least `len` bytes at `block`.
        (0..len).all(|i| unsafe { *block.add(i) } == i as u8)
    }

    /// Small to big, bigger, smaller, small again: every move keeps the bytes.
    #[test]
    fn resizing_across_the_page_line_keeps_the_contents() {
        let page = page_size();
        let sizes = [100, page, 3 * page + 17, 64 * page, 2 * page, page - 1, 10];
        let layout = |size| Layout::from_size_align(size, 8).unwrap();
        // SAFETY: each block is resized with the layout it has, and freed once.
        unsafe {
            let mut block = Allocator.alloc(layout(sizes[0]));
            fill(block, sizes[0]);
            for pair in sizes.windows(2) {
                block = Allocator.realloc(block, layout(pair[0]), pair[1]);
                assert!(!block.is_null());
                let kept = pair[0].min(pair[1]);
                assert!(holds_pattern(block, kept), "{} -> {} bytes", pair[0], pair[1]);
                fill(block, pair[1]);
            }
            Allocator.dealloc(block, layout(sizes[sizes.len() - 1]));
        }
    }

    #[test]
    fn blocks_are_aligned_and_zeroed_when_asked() {
        let page = page_size();
        for (size, align) in [(page, 64), (5 * page, page), (page, 2 * page), (24, 16), (3000, 256)] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: a valid layout; the block is freed with it.
            unsafe {
                let block = Allocator.alloc_zeroed(layout);
                assert!(!block.is_null() && block as usize % align == 0, "{size} bytes, align {align}");
                assert!((0..size).all(|i| *block.add(i) == 0), "{size} bytes not zeroed");
                Allocator.dealloc(block, layout);
            }
        }
    }

    #[test]
    fn a_freed_block_of_a_few_pages_serves_the_next_of_its_size_zeroed_if_asked() {
        let page = page_size();
        let layout = Layout::from_size_align(4 * page, 8).unwrap();
        // SAFETY: each block is freed once, with its layout.
        unsafe {
            let first = Allocator.alloc(layout);
            fill(first, layout.size());
            Allocator.dealloc(first, layout);
            let again = Allocator.alloc_zeroed(layout);
            // Another test's thread may have taken the spare in between: then it is a new block.
            assert!((0..layout.size()).all(|i| *again.add(i) == 0), "a reused block zeroed");
            Allocator.dealloc(again, layout);
            let big = Layout::from_size_align((SPARE_PAGES + 1) * page, 8).unwrap();
            let block = Allocator.alloc(big);
            assert!(!keep_spare(block, big.size()), "bigger blocks go back to the kernel");
            Allocator.dealloc(block, big);
        }
    }

    #[test]
    fn only_empty_buffers_of_a_page_or_more_are_released() {
        let page = page_size();
        let mut big: Vec<u8> = Vec::with_capacity(page);
        big.push(1);
        big.release_if_empty();
        assert!(big.capacity() >= page, "released while it held a byte");
        big.clear();
        big.release_if_empty();
        assert_eq!(big.capacity(), 0);

        let mut small: Vec<u64> = Vec::with_capacity(page / 16);
        small.release_if_empty();
        assert!(small.capacity() > 0, "a buffer under a page was released");

        let mut deque: std::collections::VecDeque<[u8; 64]> = std::collections::VecDeque::with_capacity(page);
        deque.release_if_empty();
        assert_eq!(deque.capacity(), 0);

        let mut bytes = bytes::BytesMut::with_capacity(2 * page);
        bytes.release_if_empty();
        assert_eq!(bytes.capacity(), 0);
    }
}
