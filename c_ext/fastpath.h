/* The translation fast path's interface (read by cffi as its cdef, and by fastpath.c).
 *
 * Keep this file plain declarations and integer #defines: cffi parses it.
 * docs/fastpath.md explains the design; vfiouser_iommu/iommu/fastpath.py is the only
 * caller.
 */

/* caches mirrored from Python (TranslationCaches.ddt / pdt / iotlb / gtlb) */
#define FP_DDT 0
#define FP_PDT 1
#define FP_IOTLB 2
#define FP_GTLB 3

/* pending statistics, in the order fp_take_stats reports them */
#define FP_HIT_DDT 0
#define FP_HIT_PDT 1
#define FP_HIT_IOTLB 2
#define FP_HIT_GTLB 3
#define FP_MISS_IOTLB 4
#define FP_MISS_GTLB 5
#define FP_WALK_FS 6
#define FP_WALK_GS 7
#define FP_NSTAT 8
/* followed by FP_NEVENT event counts, indexed by HPM eventID */
#define FP_NEVENT 9

/* per-device counters (RequesterStats fields, then device_walks events 4, 7, 8), in the
   order fp_flush reports them */
#define FP_DEV_READS 0
#define FP_DEV_WRITES 1
#define FP_DEV_BYTES_READ 2
#define FP_DEV_BYTES_WRITTEN 3
#define FP_DEV_TRANSLATIONS 4
#define FP_DEV_IOTLB_MISS 5
#define FP_DEV_S_WALK 6
#define FP_DEV_G_WALK 7
#define FP_NDEV 8

/* access codes */
#define FP_READ 0
#define FP_WRITE 1
#define FP_EXEC 2
/* or-ed into fp_dma's access: translate the pieces, move no data */
#define FP_TRANSLATE_ONLY 8

/* results */
#define FP_OK 0
#define FP_FALLBACK 1      /* nothing happened: run the Python reference */
#define FP_PENDING -2    /* a mirror operation refused: flush first */
#define FP_NOTFOUND -1

/* fp_dma results */
#define FP_DMA_DONE 0          /* translated and copied */
#define FP_DMA_TRANSLATE_PY 1  /* pieces[0..n) translated; translate the rest in Python */
#define FP_DMA_COPY_PY 2       /* all pieces translated; copy them in Python */
#define FP_DMA_REFUSED 3       /* nothing done, nothing counted (address overflow) */

/* words per touched-entry record of fp_flush */
#define FP_RECORD 32
/* words of a translation result: address, page_size, perms (r|w<<1|x<<2|g<<4), pbmt,
   gpa, has_gpa */
#define FP_RESULT 6

/* bumped whenever this interface changes: a stale build is then not used */
#define FP_ABI 5

typedef struct fp_iommu fp_iommu;

int fp_abi(void);
fp_iommu *fp_new(void);
void fp_free(fp_iommu *fp);
void fp_configure(fp_iommu *fp, int pas, int svpbmt, int msi_flat);
void fp_set_regs(fp_iommu *fp, uint64_t ddtp, uint64_t fctl);
int fp_set_regions(fp_iommu *fp, int n, const uint64_t *gpa, const uint64_t *size,
                   char **host, const int *writable);

/* mirror of Python-side cache operations (OrderedDict semantics) */
void fp_cache_reset(fp_iommu *fp, int cache, int64_t limit);
void fp_cache_set_limit(fp_iommu *fp, int cache, int64_t limit);
int fp_cache_set(fp_iommu *fp, int cache, const uint64_t *key, const uint64_t *value);
int fp_cache_del(fp_iommu *fp, int cache, const uint64_t *key);
int fp_cache_move(fp_iommu *fp, int cache, const uint64_t *key, int last);
int fp_cache_popitem(fp_iommu *fp, int cache, int last);
int fp_cache_clear(fp_iommu *fp, int cache);
int fp_cache_len(fp_iommu *fp, int cache);
int fp_cache_set_shifts(fp_iommu *fp, int cache, int n, const int *shifts);
int fp_cache_shifts(fp_iommu *fp, int cache, int *shift, int64_t *count, int max);

/* what the C side did since the last flush, exported and marked flushed atomically
   (layout in fastpath.c); returns the words written, or minus the words needed */
int fp_pending(fp_iommu *fp);
int64_t fp_flush(fp_iommu *fp, uint64_t *out, int64_t capacity);
/* source line of c_ext/fastpath.c where the last fallback was decided */
int fp_fallback_line(fp_iommu *fp);

/* translation of one Untranslated request; out has FP_RESULT words */
int fp_translate(fp_iommu *fp, uint64_t device_id, int64_t process_id, uint64_t iova,
                 int access, int privileged, uint64_t *out);
/* translations of n consecutive requests of the same page, for benchmarks */
int fp_translate_repeat(fp_iommu *fp, uint64_t device_id, int64_t process_id,
                        uint64_t iova, int access, int privileged, int64_t n,
                        uint64_t *out);
/* a DMA of len bytes at addr between guest memory and buf; pieces gets (gpa, len)
   pairs (max_pieces of them); stop[0] = address where Python continues, stop[1] =
   number of pieces translated */
int fp_dma(fp_iommu *fp, uint64_t device_id, int64_t process_id, int privileged,
           int access, uint64_t addr, uint64_t len, void *buf,
           uint64_t *pieces, int64_t max_pieces, uint64_t *stop);

/* One requester's DMA view (FastDmaView): its attributes, and the pieces of its last
 * access for Python to continue from (pieces: (gpa, len) pairs, npieces of them, stop:
 * where Python continues). Not thread-safe: one per thread. */
typedef struct fp_view {
    fp_iommu *fp;
    uint64_t device_id;
    int64_t process_id;     /* -1: no PASID */
    int privileged;
    int execute;
    uint64_t *pieces;
    int64_t npieces;
    int64_t capacity;       /* pairs pieces can hold */
    uint64_t stop;
    int status;
} fp_view;

/* returned by fp_view_read_int when status says what happened instead of a value */
#define FP_AGAIN 0xFFFFFFFFFFFFFFF7

fp_view *fp_view_new(fp_iommu *fp, uint64_t device_id, int64_t process_id, int privileged,
                     int execute);
void fp_view_free(fp_view *v);
/* the value read, or FP_AGAIN with status set (a value equal to FP_AGAIN has status
   FP_DMA_DONE) */
uint64_t fp_view_read_int(fp_view *v, uint64_t addr, int size);
int fp_view_write_int(fp_view *v, uint64_t addr, int size, uint64_t value);
/* access: FP_READ/FP_WRITE/FP_EXEC, optionally | FP_TRANSLATE_ONLY; fp_dma's results */
int fp_view_dma(fp_view *v, uint64_t addr, uint64_t len, int access, void *buf);
