/*
 * netbench: UDP datagrams sent as fast as the guest's network stack takes them.
 *
 *   netbench udp-send IPV4 PORT SIZE COUNT
 *
 * Sends COUNT datagrams of SIZE payload bytes (the first 8 carry a sequence number)
 * to IPV4:PORT and prints one line: "@@BENCH udp-send size=<n> ops=<n> errors=<n>
 * ns=<n>". A full socket buffer blocks the sender, so the rate is what the interface
 * drains. Built freestanding like iobench (raw Linux system calls, no C library).
 */

typedef unsigned long u64;
typedef long s64;

#define SYS_socket 198
#define SYS_sendto 206
#define SYS_write 64
#define SYS_exit_group 94
#define SYS_clock_gettime 113
#define AF_INET 2
#define SOCK_DGRAM 2
#define CLOCK_MONOTONIC 1
#define MAX_SIZE 1472

static s64 sys(s64 n, s64 a, s64 b, s64 c, s64 d, s64 e, s64 f)
{
    register s64 a0 __asm__("a0") = a;
    register s64 a1 __asm__("a1") = b;
    register s64 a2 __asm__("a2") = c;
    register s64 a3 __asm__("a3") = d;
    register s64 a4 __asm__("a4") = e;
    register s64 a5 __asm__("a5") = f;
    register s64 a7 __asm__("a7") = n;
    __asm__ volatile("ecall" : "+r"(a0) : "r"(a1), "r"(a2), "r"(a3), "r"(a4), "r"(a5), "r"(a7)
                     : "memory");
    return a0;
}

static unsigned char payload[MAX_SIZE];

static u64 len(const char *s) { u64 n = 0; while (s[n]) n++; return n; }
static void out(const char *s) { sys(SYS_write, 1, (s64)s, (s64)len(s), 0, 0, 0); }
static void die(const char *s)
{
    out("netbench: "); out(s); out("\n");
    sys(SYS_exit_group, 1, 0, 0, 0, 0, 0);
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

/* "a.b.c.d" -> the address in network byte order, as sockaddr_in holds it. */
static unsigned int ipv4(const char *s)
{
    unsigned int addr = 0, part = 0, shift = 0, digits = 0;
    for (;; s++) {
        if (*s >= '0' && *s <= '9') {
            part = part * 10 + (unsigned int)(*s - '0');
            if (part > 255 || ++digits > 3) die("bad IPv4 address");
        } else if ((*s == '.' || !*s) && digits && shift < 32) {
            addr |= part << shift;
            shift += 8;
            part = digits = 0;
            if (!*s) break;
        } else {
            die("bad IPv4 address");
        }
    }
    if (shift != 32) die("bad IPv4 address");
    return addr;
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
    sys(SYS_clock_gettime, CLOCK_MONOTONIC, (s64)ts, 0, 0, 0, 0);
    return (u64)ts[0] * 1000000000UL + (u64)ts[1];
}

static int same(const char *a, const char *b) { while (*a && *a == *b) a++, b++; return *a == *b; }

static void udp_send(char **argv)
{
    struct { unsigned short family, port; unsigned int addr; unsigned char zero[8]; } to;
    u64 port = number(argv[3]), size = number(argv[4]), count = number(argv[5]);
    u64 i, errors = 0, start, end;
    s64 fd;

    if (port == 0 || port > 65535) die("bad port");
    if (size < 8 || size > MAX_SIZE) die("size: 8..1472");
    to.family = AF_INET;
    to.port = (unsigned short)((port >> 8) | ((port & 0xff) << 8));
    to.addr = ipv4(argv[2]);
    for (i = 0; i < 8; i++) to.zero[i] = 0;
    fd = sys(SYS_socket, AF_INET, SOCK_DGRAM, 0, 0, 0, 0);
    if (fd < 0) die("socket");
    start = now_ns();
    for (i = 0; i < count; i++) {
        *(u64 *)payload = i;
        if (sys(SYS_sendto, fd, (s64)payload, (s64)size, 0, (s64)&to, sizeof(to)) != (s64)size)
            errors++;
    }
    end = now_ns();
    out("@@BENCH udp-send");
    put(" size=", size);
    put(" ops=", count);
    put(" errors=", errors);
    put(" ns=", end - start);
    out("\n");
}

/* The kernel enters here with argc at sp[0] and argv from sp[1]. */
__attribute__((used)) static void entry(s64 *sp)
{
    char **argv = (char **)(sp + 1);
    if (sp[0] != 6 || !same(argv[1], "udp-send"))
        die("usage: netbench udp-send IPV4 PORT SIZE COUNT");
    udp_send(argv);
    sys(SYS_exit_group, 0, 0, 0, 0, 0, 0);
}

__asm__(".text\n.global _start\n_start:\n mv a0, sp\n andi sp, sp, -16\n call entry\n");
