/*
 * blklog: a checksummed log written to a block device, for data-safety tests.
 *
 *   blklog DEVICE RECORD_SECTORS FLUSH_EVERY RECORDS
 *
 * Writes RECORDS records of RECORD_SECTORS 512-byte sectors one after the other from
 * offset 0 (O_DIRECT, one write per record), and fsync()s after every FLUSH_EVERY
 * records, printing "@@FLUSHED <seq>" once records 0..seq are durable. Every sector
 * describes itself, so the host can check each one alone (lab/blklog.py reads them):
 *
 *   0   "VFUBLKLG"            magic
 *   8   u64 seq               record number
 *   16  u32 index             sector within the record
 *   20  u32 sectors           RECORD_SECTORS
 *   24  payload               xorshift stream seeded by (seq, index)
 *   508 u32 checksum          FNV-1a of bytes 0..507
 *
 * A failed write or fsync prints "@@IOERR <seq> <errno>" and exits 2; the end prints
 * "@@LOGDONE <records>". Freestanding, raw system calls (see iobench.c).
 */

typedef unsigned long u64;
typedef unsigned int u32;
typedef long s64;

#define SYS_ioctl 29
#define SYS_openat 56
#define SYS_write 64
#define SYS_pwrite64 68
#define SYS_fsync 82
#define SYS_exit_group 94
#define AT_FDCWD (-100)
#define O_RDWR 2
#define O_DIRECT 040000
#define BLKGETSIZE64 0x80081272UL
#define SECTOR 512
#define MAX_SECTORS 256

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

static unsigned char record[MAX_SECTORS * SECTOR] __attribute__((aligned(4096)));

static u64 len(const char *s) { u64 n = 0; while (s[n]) n++; return n; }
static void out(const char *s) { sys(SYS_write, 1, (s64)s, (s64)len(s), 0); }
static void die(const char *s) { out("blklog: "); out(s); out("\n"); sys(SYS_exit_group, 1, 0, 0, 0); }

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

static void store(unsigned char *p, u64 v, int bytes)
{
    for (int i = 0; i < bytes; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void fill_sector(unsigned char *s, u64 seq, u32 index, u32 sectors)
{
    u64 x = (seq + 1) * 0x9E3779B97F4A7C15UL ^ ((u64)index + 1) * 0xBF58476D1CE4E5B9UL;
    u32 h = 2166136261U;
    const char *magic = "VFUBLKLG";
    for (int i = 0; i < 8; i++) s[i] = (unsigned char)magic[i];
    store(s + 8, seq, 8);
    store(s + 16, index, 4);
    store(s + 20, sectors, 4);
    for (int i = 24; i < 508; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        s[i] = (unsigned char)x;
    }
    for (int i = 0; i < 508; i++) h = (h ^ s[i]) * 16777619U;
    store(s + 508, h, 4);
}

static void fail(u64 seq, s64 err)
{
    put("@@IOERR ", seq);
    put(" ", (u64)-err);
    out("\n");
    sys(SYS_exit_group, 2, 0, 0, 0);
}

__attribute__((used)) static void entry(s64 *sp)
{
    char **argv = (char **)(sp + 1);
    u64 sectors, every, records, size = 0, seq;
    s64 fd, r;

    if (sp[0] != 5) die("usage: blklog DEVICE RECORD_SECTORS FLUSH_EVERY RECORDS");
    sectors = number(argv[2]);
    every = number(argv[3]);
    records = number(argv[4]);
    if (sectors == 0 || sectors > MAX_SECTORS || every == 0) die("bad arguments");
    fd = sys(SYS_openat, AT_FDCWD, (s64)argv[1], O_RDWR | O_DIRECT, 0);
    if (fd < 0) die("cannot open the device");
    if (sys(SYS_ioctl, fd, (s64)BLKGETSIZE64, (s64)&size, 0) < 0) die("device size");
    if (records * sectors * SECTOR > size) records = size / (sectors * SECTOR);
    for (seq = 0; seq < records; seq++) {
        for (u32 i = 0; i < sectors; i++)
            fill_sector(record + i * SECTOR, seq, i, (u32)sectors);
        r = sys(SYS_pwrite64, fd, (s64)record, (s64)(sectors * SECTOR),
                (s64)(seq * sectors * SECTOR));
        if (r != (s64)(sectors * SECTOR)) fail(seq, r < 0 ? r : -5);
        if ((seq + 1) % every == 0) {
            r = sys(SYS_fsync, fd, 0, 0, 0);
            if (r < 0) fail(seq, r);
            put("@@FLUSHED ", seq);
            out("\n");
        }
    }
    put("@@LOGDONE ", records);
    out("\n");
    sys(SYS_exit_group, 0, 0, 0, 0);
}

__asm__(".text\n.global _start\n_start:\n mv a0, sp\n andi sp, sp, -16\n call entry\n");
