/*
 * iobench: O_DIRECT block-device reads timed inside a lab guest.
 *
 *   iobench seq  DEVICE BLOCK_BYTES TOTAL_BYTES   sequential reads from offset 0
 *   iobench rand DEVICE BLOCK_BYTES COUNT         reads at random aligned offsets
 *
 * Prints one line: "@@BENCH <mode> block=<n> ops=<n> bytes=<n> ns=<n>".
 * Built freestanding (no libc: the lab has no riscv64 C library) with raw Linux
 * system calls, so a cross compiler alone is enough.
 */

typedef unsigned long u64;
typedef long s64;

#define SYS_ioctl 29
#define SYS_openat 56
#define SYS_write 64
#define SYS_pread64 67
#define SYS_exit_group 94
#define SYS_clock_gettime 113
#define AT_FDCWD (-100)
#define O_RDONLY 0
#define O_DIRECT 040000
#define BLKGETSIZE64 0x80081272UL
#define CLOCK_MONOTONIC 1
#define MAX_BLOCK (1UL << 20)

static s64 sys(s64 n, s64 a, s64 b, s64 c, s64 d)
{
    register s64 a0 __asm__("a0") = a;
    register s64 a1 __asm__("a1") = b;
    register s64 a2 __asm__("a2") = c;
    register s64 a3 __asm__("a3") = d;
    register s64 a7 __asm__("a7") = n;
    __asm__ volatile("ecall" : "+r"(a0) : "r"(a1), "r"(a2), "r"(a3), "r"(a7) : "memory");
    return a0;
}

static char buffer[MAX_BLOCK] __attribute__((aligned(4096)));

static u64 len(const char *s) { u64 n = 0; while (s[n]) n++; return n; }
static void out(const char *s) { sys(SYS_write, 1, (s64)s, (s64)len(s), 0); }
static void die(const char *s) { out("iobench: "); out(s); out("\n"); sys(SYS_exit_group, 1, 0, 0, 0); }

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
    sys(SYS_clock_gettime, CLOCK_MONOTONIC, (s64)ts, 0, 0);
    return (u64)ts[0] * 1000000000UL + (u64)ts[1];
}

static int same(const char *a, const char *b) { while (*a && *a == *b) a++, b++; return *a == *b; }

static u64 xorshift(u64 *s) { *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17; return *s; }

static void run(char **argv)
{
    int random = same(argv[1], "rand");
    u64 block = number(argv[3]), arg = number(argv[4]), size = 0, seed = 88172645463325252UL;
    u64 ops = random ? arg : arg / block, bytes = 0, start, end, i;
    s64 fd;

    if (!random && !same(argv[1], "seq")) die("mode is seq or rand");
    if (block == 0 || block > MAX_BLOCK || block % 512) die("block: 512..1048576, 512-aligned");
    fd = sys(SYS_openat, AT_FDCWD, (s64)argv[2], O_RDONLY | O_DIRECT, 0);
    if (fd < 0) die("cannot open the device");
    if (sys(SYS_ioctl, fd, (s64)BLKGETSIZE64, (s64)&size, 0) < 0 || size < block) die("device size");
    start = now_ns();
    for (i = 0; i < ops; i++) {
        u64 offset = random ? (xorshift(&seed) % (size / block)) * block : (i * block) % size;
        if (sys(SYS_pread64, fd, (s64)buffer, (s64)block, (s64)offset) != (s64)block) die("read failed");
        bytes += block;
    }
    end = now_ns();
    out("@@BENCH ");
    out(argv[1]);
    put(" block=", block);
    put(" ops=", ops);
    put(" bytes=", bytes);
    put(" ns=", end - start);
    out("\n");
}

/* The kernel enters here with argc at sp[0] and argv from sp[1]. */
__attribute__((used)) static void entry(s64 *sp)
{
    if (sp[0] != 5) die("usage: iobench seq|rand DEVICE BLOCK_BYTES TOTAL_BYTES|COUNT");
    run((char **)(sp + 1));
    sys(SYS_exit_group, 0, 0, 0, 0);
}

__asm__(".text\n.global _start\n_start:\n mv a0, sp\n andi sp, sp, -16\n call entry\n");
