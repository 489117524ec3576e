/* Counts the bytes a process holds through malloc and its relatives (live and peak), for
   bundle/memory.py: preloaded with LD_PRELOAD, read through ctypes. glibc only. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stddef.h>
#include <errno.h>
#include <stdatomic.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

static _Atomic long live_bytes, peak_bytes;

static void add(long delta) {
    long now = atomic_fetch_add(&live_bytes, delta) + delta;
    long peak = atomic_load(&peak_bytes);
    while (now > peak && !atomic_compare_exchange_weak(&peak_bytes, &peak, now)) {}
}
static void *noted(void *p) { if (p) add((long)malloc_usable_size(p)); return p; }

void *malloc(size_t n) { return noted(__libc_malloc(n)); }
void *calloc(size_t n, size_t s) { return noted(__libc_calloc(n, s)); }
void free(void *p) { if (p) add(-(long)malloc_usable_size(p)); __libc_free(p); }
void *realloc(void *p, size_t n) {
    long before = p ? (long)malloc_usable_size(p) : 0;
    void *q = __libc_realloc(p, n);
    if (q) { add(-before); add((long)malloc_usable_size(q)); } else if (n == 0 && p) { add(-before); }
    return q;
}
void *memalign(size_t a, size_t n) { return noted(__libc_memalign(a, n)); }
void *aligned_alloc(size_t a, size_t n) { return noted(__libc_memalign(a, n)); }
int posix_memalign(void **out, size_t a, size_t n) {
    void *p = __libc_memalign(a, n);
    if (!p) return ENOMEM;
    *out = noted(p);
    return 0;
}
long heapcount_live(void) { return atomic_load(&live_bytes); }
long heapcount_peak(void) { return atomic_load(&peak_bytes); }
void heapcount_reset_peak(void) { atomic_store(&peak_bytes, atomic_load(&live_bytes)); }
