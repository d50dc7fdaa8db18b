/*
 * iobench: O_DIRECT block-device I/O timed inside a lab guest.
 *
 *   iobench MODE DEVICE BLOCK_BYTES AMOUNT [QUEUE_DEPTH [JOBS]]
 *
 *   seq    sequential reads from offset 0; AMOUNT is the total bytes
 *   rand   reads at random aligned offsets; AMOUNT is the number of reads
 *   write  writes at random aligned offsets, each followed by fdatasync (a FLUSH)
 *          before the next; AMOUNT is the number of writes; queue depth 1 only
 *   mix    random reads and writes, half and half (chosen at random); AMOUNT ops
 *
 * JOBS processes (default 1) share the AMOUNT between them, each keeping
 * QUEUE_DEPTH (default 1) requests in flight with Linux AIO (io_submit), or with
 * plain pread/pwrite at depth 1. The time is from before the first job starts to
 * after the last one ends. Prints one line:
 *   "@@BENCH <mode> block=<n> ops=<n> bytes=<n> ns=<n> qd=<n> jobs=<n>"
 * Built freestanding (no libc: the lab has no riscv64 C library) with raw Linux
 * system calls, so a cross compiler alone is enough.
 */

typedef unsigned long u64;
typedef long s64;
typedef unsigned int u32;
typedef unsigned short u16;

#define SYS_io_setup 0
#define SYS_io_submit 2
#define SYS_io_getevents 4
#define SYS_ioctl 29
#define SYS_openat 56
#define SYS_write 64
#define SYS_pread64 67
#define SYS_pwrite64 68
#define SYS_fdatasync 83
#define SYS_exit_group 94
#define SYS_clock_gettime 113
#define SYS_clone 220
#define SYS_wait4 260
#define AT_FDCWD (-100)
#define O_RDWR 2
#define O_DIRECT 040000
#define SIGCHLD 17
#define BLKGETSIZE64 0x80081272UL
#define CLOCK_MONOTONIC 1
#define MAX_BLOCK (1UL << 20)
#define MAX_QD 64
#define MAX_JOBS 16
#define BUFFER_BYTES (4UL << 20)
#define IOCB_CMD_PREAD 0
#define IOCB_CMD_PWRITE 1

enum mode { SEQ, RAND, WRITE, MIX };

struct iocb {                   /* linux/aio_abi.h, little-endian 64-bit layout */
    u64 data;
    u32 key, rw_flags;
    u16 opcode;
    short reqprio;
    u32 fildes;
    u64 buf, nbytes;
    s64 offset;
    u64 reserved2;
    u32 flags, resfd;
};

struct io_event { u64 data, obj; s64 res, res2; };

static s64 sys(s64 n, s64 a, s64 b, s64 c, s64 d, s64 e)
{
    register s64 a0 __asm__("a0") = a;
    register s64 a1 __asm__("a1") = b;
    register s64 a2 __asm__("a2") = c;
    register s64 a3 __asm__("a3") = d;
    register s64 a4 __asm__("a4") = e;
    register s64 a7 __asm__("a7") = n;
    __asm__ volatile("ecall" : "+r"(a0) : "r"(a1), "r"(a2), "r"(a3), "r"(a4), "r"(a7)
                     : "memory");
    return a0;
}

/* The compiler may call these for struct copies and initialisers, even freestanding. */
void *memset(void *d, int c, u64 n) { char *p = d; while (n--) *p++ = (char)c; return d; }
void *memcpy(void *d, const void *s, u64 n)
{
    char *p = d;
    const char *q = s;
    while (n--) *p++ = *q++;
    return d;
}

static char buffer[BUFFER_BYTES] __attribute__((aligned(4096)));
static struct iocb iocbs[MAX_QD];
static struct io_event events[MAX_QD];

static u64 len(const char *s) { u64 n = 0; while (s[n]) n++; return n; }
static void out(const char *s) { sys(SYS_write, 1, (s64)s, (s64)len(s), 0, 0); }
static void die(const char *s)
{
    out("iobench: "); out(s); out("\n");
    sys(SYS_exit_group, 1, 0, 0, 0, 0);
}

static u64 number(const char *s)
{
    u64 v = 0;
    if (!*s) die("bad number");
    for (; *s; s++) {
        if (*s < '0' || *s > '9') die("bad number");
        v = v * 10 + (u64)(*s - '0');
    }
    return v;
}

static void put(const char *key, u64 v)
{
    char digits[24], *p = digits + sizeof(digits) - 1;
    *p = 0;
    do { *--p = (char)('0' + v % 10); v /= 10; } while (v);
    out(key);
    out(p);
}

static u64 now_ns(void)
{
    s64 ts[2];
    sys(SYS_clock_gettime, CLOCK_MONOTONIC, (s64)ts, 0, 0, 0);
    return (u64)ts[0] * 1000000000UL + (u64)ts[1];
}

static int same(const char *a, const char *b) { while (*a && *a == *b) a++, b++; return *a == *b; }

static u64 xorshift(u64 *s) { *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17; return *s; }

struct job {
    enum mode mode;
    s64 fd;
    u64 block, blocks, ops, qd, next, seed;
};

/* Where op `i` of this job goes, and whether it writes. */
static u64 offset_of(struct job *j, u64 i, int *write)
{
    u64 r;
    *write = j->mode == WRITE;
    if (j->mode == SEQ)
        return (i % j->blocks) * j->block;
    r = xorshift(&j->seed);
    if (j->mode == MIX)
        *write = (int)(r >> 40) & 1;
    return (r % j->blocks) * j->block;
}

static void run_sync(struct job *j)
{
    u64 i;
    int write;
    for (i = 0; i < j->ops; i++) {
        u64 off = offset_of(j, j->next + i, &write);
        s64 n = sys(write ? SYS_pwrite64 : SYS_pread64, j->fd, (s64)buffer, (s64)j->block,
                    (s64)off, 0);
        if (n != (s64)j->block) die(write ? "write failed" : "read failed");
        if (j->mode == WRITE && sys(SYS_fdatasync, j->fd, 0, 0, 0, 0) != 0) die("fdatasync failed");
    }
}

static void submit(struct job *j, s64 ctx, u64 slot, u64 i)
{
    struct iocb *cb = &iocbs[slot], *list[1] = { cb };
    int write;
    u64 off = offset_of(j, j->next + i, &write);
    *cb = (struct iocb){ .data = slot, .opcode = write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD,
                         .fildes = (u32)j->fd, .buf = (u64)(buffer + slot * j->block),
                         .nbytes = j->block, .offset = (s64)off };
    if (sys(SYS_io_submit, ctx, 1, (s64)list, 0, 0) != 1) die("io_submit failed");
}

/* Keep j->qd requests in flight until j->ops have completed. */
static void run_aio(struct job *j)
{
    u64 ctx = 0, issued = 0, done = 0, slot;
    if (sys(SYS_io_setup, (s64)j->qd, (s64)&ctx, 0, 0, 0) != 0) die("io_setup failed");
    for (slot = 0; slot < j->qd && issued < j->ops; slot++)
        submit(j, (s64)ctx, slot, issued++);
    while (done < j->ops) {
        s64 n = sys(SYS_io_getevents, (s64)ctx, 1, (s64)j->qd, (s64)events, 0), k;
        if (n <= 0) die("io_getevents failed");
        for (k = 0; k < n; k++) {
            if (events[k].res != (s64)j->block) die("I/O failed");
            done++;
            if (issued < j->ops)
                submit(j, (s64)ctx, events[k].data, issued++);
        }
    }
}

static void run_job(struct job *j)
{
    if (j->qd == 1)
        run_sync(j);
    else
        run_aio(j);
}

static void run(int argc, char **argv)
{
    struct job j = { .seed = 88172645463325252UL };
    u64 amount, size = 0, jobs = 1, ops, start, end, k;
    s64 status;

    if (same(argv[1], "seq")) j.mode = SEQ;
    else if (same(argv[1], "rand")) j.mode = RAND;
    else if (same(argv[1], "write")) j.mode = WRITE;
    else if (same(argv[1], "mix")) j.mode = MIX;
    else die("mode is seq, rand, write or mix");
    j.block = number(argv[3]);
    amount = number(argv[4]);
    j.qd = argc > 5 ? number(argv[5]) : 1;
    jobs = argc > 6 ? number(argv[6]) : 1;
    if (j.block == 0 || j.block > MAX_BLOCK || j.block % 512) die("block: 512..1048576, 512-aligned");
    if (j.qd == 0 || j.qd > MAX_QD || j.qd * j.block > BUFFER_BYTES) die("queue depth: 1..64, depth*block <= 4 MiB");
    if (jobs == 0 || jobs > MAX_JOBS) die("jobs: 1..16");
    if (j.mode == WRITE && j.qd != 1) die("write mode runs at queue depth 1");
    j.fd = sys(SYS_openat, AT_FDCWD, (s64)argv[2], O_RDWR | O_DIRECT, 0, 0);
    if (j.fd < 0) die("cannot open the device");
    if (sys(SYS_ioctl, j.fd, (s64)BLKGETSIZE64, (s64)&size, 0, 0) < 0 || size < j.block) die("device size");
    j.blocks = size / j.block;
    ops = j.mode == SEQ ? amount / j.block : amount;

    start = now_ns();
    for (k = 0; k < jobs; k++) {
        struct job mine = j;
        mine.ops = ops / jobs + (k < ops % jobs);
        mine.next = k * (ops / jobs) + (k < ops % jobs ? k : ops % jobs);
        mine.seed ^= k * 0x9E3779B97F4A7C15UL;
        if (jobs == 1) {
            run_job(&mine);
        } else if (sys(SYS_clone, SIGCHLD, 0, 0, 0, 0) == 0) {
            run_job(&mine);
            sys(SYS_exit_group, 0, 0, 0, 0, 0);
        }
    }
    for (k = 0; jobs > 1 && k < jobs; k++) {
        status = 0;
        if (sys(SYS_wait4, -1, (s64)&status, 0, 0, 0) < 0 || status != 0) die("a job failed");
    }
    end = now_ns();
    out("@@BENCH ");
    out(argv[1]);
    put(" block=", j.block);
    put(" ops=", ops);
    put(" bytes=", ops * j.block);
    put(" ns=", end - start);
    put(" qd=", j.qd);
    put(" jobs=", jobs);
    out("\n");
}

/* The kernel enters here with argc at sp[0] and argv from sp[1]. */
__attribute__((used)) static void entry(s64 *sp)
{
    if (sp[0] < 5 || sp[0] > 7)
        die("usage: iobench seq|rand|write|mix DEVICE BLOCK_BYTES AMOUNT [QUEUE_DEPTH [JOBS]]");
    run((int)sp[0], (char **)(sp + 1));
    sys(SYS_exit_group, 0, 0, 0, 0, 0);
}

__asm__(".text\n.global _start\n_start:\n mv a0, sp\n andi sp, sp, -16\n call entry\n");
