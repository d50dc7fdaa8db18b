// SPDX-License-Identifier: GPL-2.0
/*
 * vfiouser-iommu's guest test module: makes Linux's own riscv-iommu driver build and
 * invalidate real page tables for the iommu-testdev (1b36:0005), and exercises the
 * parts of the RISC-V IOMMU (spec v1.0.1) that stock Linux never programs: MSI page
 * tables (flat basic-translate and MRIF, §3.1.3.6, §3.3 step 18) and a second stage
 * under Linux's first stage (iohgatp, §3.1.3.2).
 *
 * Only exported kernel API and the spec's register and table layouts are used. The
 * device context is written by this module only while it is invalid: between claiming
 * the testdev's DMA ownership (the group is then blocked, DC.tc.V=0) and attaching a
 * paging domain, whose attach makes the driver write tc/fsc/ta and send IODIR.INVAL_DDT.
 *
 * Every check prints one machine-readable line on the kernel log:
 *     @@RESULT kmod-<check> pass|fail key=value ...
 * Parameters select the checks (checks=paging,msi,nested,alloc,bench) and the devices;
 * `bench` times testdev DMAs through a paging domain (not part of checks=all).
 */
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/iommu.h>
#include <linux/io.h>
#include <linux/interrupt.h>
#include <linux/delay.h>
#include <linux/gfp.h>
#include <linux/mm.h>
#include <linux/msi.h>
#include <linux/irqchip/riscv-imsic.h>

static char *checks = "paging";
module_param(checks, charp, 0444);
MODULE_PARM_DESC(checks, "comma-separated: alloc, paging, msi, nested, bench");
static char *testdev = "";
module_param(testdev, charp, 0444);
MODULE_PARM_DESC(testdev, "PCI address of the iommu-testdev (default: the first 1b36:0005)");

#define RESULT(name, ok, fmt, ...) \
	pr_info("@@RESULT kmod-%s %s " fmt "\n", name, (ok) ? "pass" : "fail", ##__VA_ARGS__)

/* iommu-testdev BAR0 (QEMU's registers, then our extensions; endpoints/testdev.py) */
#define TD_TRIGGER	0x00
#define TD_GVA_LO	0x04
#define TD_GVA_HI	0x08
#define TD_LEN		0x0c
#define TD_RESULT	0x10
#define TD_DBELL	0x14
#define TD_GPA_LO	0x1c
#define TD_GPA_HI	0x20
#define TD_CTRL		0x28
#define TD_DATA		0x30
#define TD_MSI_ADDR_LO	0x34
#define TD_MSI_ADDR_HI	0x38
#define TD_MSI_DATA	0x3c
#define TD_MSI_CTRL	0x40
#define TD_MSI_RESULT	0x44
#define TD_DIR_WRITE_VERIFY	0
#define TD_DIR_READ		1
#define TD_DIR_WRITE		2
#define TD_OK		0
#define TD_TX_FAIL	0xdead0002
#define TD_PATTERN	0x12345678

/* RISC-V IOMMU registers and fields (spec v1.0.1 chapter 5) */
#define R_CAPS		0x000
#define R_DDTP		0x010
#define R_TR_IOVA	0x258
#define R_TR_CTL	0x260
#define R_TR_RESP	0x268
#define CAP_SVPBMT	BIT_ULL(15)
#define CAP_SV39X4	BIT_ULL(17)
#define CAP_SV48X4	BIT_ULL(18)
#define CAP_MSI_FLAT	BIT_ULL(22)
#define CAP_MSI_MRIF	BIT_ULL(23)
#define CAP_DBG		BIT_ULL(31)
#define PPN_MASK	GENMASK_ULL(53, 10)
#define PTE_V		BIT_ULL(0)
#define PTE_LEAF	(BIT_ULL(0) | BIT_ULL(1) | BIT_ULL(2) | BIT_ULL(3) | BIT_ULL(4) | \
			 BIT_ULL(6) | BIT_ULL(7))	/* V R W X U A D */
/* extended device context doublewords */
enum { DC_TC, DC_IOHGATP, DC_TA, DC_FSC, DC_MSIPTP, DC_MSI_MASK, DC_MSI_PATTERN };

struct ctx {
	struct pci_dev *tdev, *idev;
	void __iomem *bar, *regs;
	struct iommu_group *group;
	struct iommu_domain *domain;
	u32 devid;
	u64 caps;
	bool ours;			/* the testdev has our extensions (direction, MSI) */
	struct page *a, *b;		/* two data pages */
};

static const char *mode_name(u64 mode)
{
	static const char * const names[] = { [0] = "bare", [8] = "sv39", [9] = "sv48",
					      [10] = "sv57" };
	return mode < ARRAY_SIZE(names) && names[mode] ? names[mode] : "other";
}

/* -- the testdev ---------------------------------------------------------------------- */

static u32 td_dma(struct ctx *c, u64 iova, phys_addr_t gpa, u32 len, u32 dir)
{
	writel(lower_32_bits(iova), c->bar + TD_GVA_LO);
	writel(upper_32_bits(iova), c->bar + TD_GVA_HI);
	writel(lower_32_bits(gpa), c->bar + TD_GPA_LO);
	writel(upper_32_bits(gpa), c->bar + TD_GPA_HI);
	writel(len, c->bar + TD_LEN);
	writel(dir << 1, c->bar + TD_CTRL);
	writel(1, c->bar + TD_DBELL);
	readl(c->bar + TD_TRIGGER);
	return readl(c->bar + TD_RESULT);
}

/* A write DMA of the pattern to `iova` that must land in page `pg`. */
static bool td_write(struct ctx *c, u64 iova, struct page *pg, u32 *result)
{
	u32 *va = page_address(pg) + offset_in_page(iova);

	*va = 0;
	*result = td_dma(c, iova, page_to_phys(pg) + offset_in_page(iova), 8,
			 TD_DIR_WRITE_VERIFY);
	return *result == TD_OK && READ_ONCE(*va) == TD_PATTERN;
}

/* A read DMA from `iova` of a value placed in `pg` (our testdev only). */
static int td_read(struct ctx *c, u64 iova, struct page *pg, u32 value)
{
	u32 *va = page_address(pg) + offset_in_page(iova);
	u32 result;

	if (!c->ours)
		return -EOPNOTSUPP;
	WRITE_ONCE(*va, value);
	result = td_dma(c, iova, 0, 4, TD_DIR_READ);
	if (result != TD_OK)
		return -EIO;
	return readl(c->bar + TD_DATA) == value ? 0 : -EBADMSG;
}

/* -- the IOMMU's tables --------------------------------------------------------------- */

/* The testdev's device context in the driver's device directory (§3.1, §3.1.1). */
static u64 *device_context(struct ctx *c)
{
	u64 ddtp = readq(c->regs + R_DDTP);
	int levels = (int)(ddtp & 0xf) - 1;	/* 1LVL=2, 2LVL=3, 3LVL=4 */
	bool ext = c->caps & CAP_MSI_FLAT;
	int low = ext ? 6 : 7;
	u64 *table = phys_to_virt((ddtp & PPN_MASK) << 2);
	int lvl;

	if (levels < 1 || levels > 3)
		return NULL;
	for (lvl = levels - 1; lvl > 0; lvl--) {
		u64 e = READ_ONCE(table[(c->devid >> (low + 9 * (lvl - 1))) & 0x1ff]);

		if (!(e & PTE_V))
			return NULL;
		table = phys_to_virt((e & PPN_MASK) << 2);
	}
	return (u64 *)((u8 *)table + (c->devid & ((1 << low) - 1)) * (ext ? 64 : 32));
}

/* Debug-interface translation (§5.18-5.20): the leaf size the IOMMU walked, 0 on fault. */
static u64 debug_leaf_size(struct ctx *c, u64 iova)
{
	u64 resp, ppn;
	int i;

	if (!(c->caps & CAP_DBG))
		return 0;
	writeq(iova & ~0xfffULL, c->regs + R_TR_IOVA);
	writeq((u64)c->devid << 40 | BIT_ULL(0), c->regs + R_TR_CTL);
	for (i = 0; i < 1000 && (readq(c->regs + R_TR_CTL) & 1); i++)
		udelay(10);
	resp = readq(c->regs + R_TR_RESP);
	if (resp & 1)
		return 0;
	if (!(resp & BIT_ULL(9)))
		return SZ_4K;
	ppn = (resp & PPN_MASK) >> 10;	/* S=1: trailing ones give the size (NAPOT) */
	return SZ_8K << __builtin_ctzll(~ppn);
}

/* -- attach with a device context prepared by us ------------------------------------- */

/*
 * The group is claimed (blocked: DC invalid). Write the fields the driver never touches,
 * then attach `c->domain`: the driver writes tc/fsc/ta and sends IODIR.INVAL_DDT.
 */
static int attach_with(struct ctx *c, u64 iohgatp, u64 msiptp, u64 mask, u64 pattern)
{
	u64 *dc = device_context(c);

	if (!dc)
		return -ENODEV;
	if (READ_ONCE(dc[DC_TC]) & 1)
		return -EBUSY;
	WRITE_ONCE(dc[DC_IOHGATP], iohgatp);
	if (c->caps & CAP_MSI_FLAT) {
		WRITE_ONCE(dc[DC_MSIPTP], msiptp);
		WRITE_ONCE(dc[DC_MSI_MASK], mask);
		WRITE_ONCE(dc[DC_MSI_PATTERN], pattern);
	}
	wmb();
	return iommu_attach_group(c->domain, c->group);
}

static void detach_and_clear(struct ctx *c)
{
	u64 *dc;

	iommu_detach_group(c->domain, c->group);	/* back to blocked, DC invalid */
	dc = device_context(c);
	if (dc && !(READ_ONCE(dc[DC_TC]) & 1)) {
		WRITE_ONCE(dc[DC_IOHGATP], 0);
		if (c->caps & CAP_MSI_FLAT) {
			WRITE_ONCE(dc[DC_MSIPTP], 0);
			WRITE_ONCE(dc[DC_MSI_MASK], 0);
			WRITE_ONCE(dc[DC_MSI_PATTERN], 0);
		}
		wmb();
	}
}

static int new_domain(struct ctx *c, const char *check)
{
	c->domain = iommu_paging_domain_alloc(&c->tdev->dev);
	if (IS_ERR(c->domain)) {
		long err = PTR_ERR(c->domain);

		c->domain = NULL;
		RESULT(check, 0, "err=%ld svpbmt=%d", err, !!(c->caps & CAP_SVPBMT));
		return err;
	}
	return 0;
}

static void free_domain(struct ctx *c)
{
	if (c->domain)
		iommu_domain_free(c->domain);
	c->domain = NULL;
}

/* -- alloc: can the driver allocate a paging domain at all? -------------------------- */

static void check_alloc(struct ctx *c)
{
	if (new_domain(c, "paging-domain-alloc"))
		return;
	RESULT("paging-domain-alloc", 1, "svpbmt=%d aperture_end=0x%llx pgsize=0x%lx",
	       !!(c->caps & CAP_SVPBMT), (u64)c->domain->geometry.aperture_end,
	       c->domain->pgsize_bitmap);
	free_domain(c);
}

/* -- paging: first stage built by Linux's driver -------------------------------------- */

struct mapping {
	const char *name;
	u64 iova;		/* naturally aligned to size */
	u64 size;
};

/* Map [iova, iova+size) onto the naturally aligned physical range holding page `pg`;
 * return the IOVA at which `pg` appears. */
static u64 map_around(struct ctx *c, const struct mapping *m, struct page *pg, int *err)
{
	phys_addr_t pa = page_to_phys(pg);

	*err = iommu_map(c->domain, m->iova, round_down(pa, m->size), m->size,
			 IOMMU_READ | IOMMU_WRITE, GFP_KERNEL);
	return m->iova + (pa & (m->size - 1));
}

static void check_mapping(struct ctx *c, const struct mapping *m)
{
	char name[40];
	u64 at, leaf;
	u32 result;
	int err, rd;
	bool wr;

	snprintf(name, sizeof(name), "map-%s", m->name);
	at = map_around(c, m, c->a, &err);
	if (err) {
		RESULT(name, 0, "iommu_map=%d iova=0x%llx size=0x%llx", err, m->iova, m->size);
		return;
	}
	wr = td_write(c, at, c->a, &result);
	rd = td_read(c, at, c->a, 0xc0de0000 | (u32)(m->size >> 12));
	leaf = debug_leaf_size(c, at);
	RESULT(name, wr && rd != -EIO && rd != -EBADMSG &&
	       iommu_iova_to_phys(c->domain, at) == page_to_phys(c->a),
	       "iova=0x%llx size=0x%llx write=0x%x read=%s leaf=0x%llx", at, m->size, result,
	       rd == 0 ? "ok" : rd == -EOPNOTSUPP ? "n/a" : "bad", leaf);
}

/* Touch every 4 KiB page of the mapping (so the IOMMU caches it), unmap, and check that
 * every page now faults: the driver's invalidation (one S=1 NAPOT range when the IOMMU
 * has S) must cover the whole range. */
static u32 td_probe(struct ctx *c, u64 iova)
{
	u32 result;

	if (c->ours)
		return td_dma(c, iova, 0, 4, TD_DIR_READ);
	td_write(c, iova, c->a, &result);	/* only ever at page a's own IOVA */
	return result;
}

static void check_unmap(struct ctx *c, const struct mapping *m)
{
	u64 at = m->iova + (page_to_phys(c->a) & (m->size - 1));
	u64 step = m->size > SZ_64K ? m->size / 16 : SZ_4K, off, faults = 0, probes = 0;
	char name[40];
	size_t gone;

	/* Our testdev reads across the whole range; QEMU's can only write, so it writes
	 * only where page a is. */
	for (off = 0; off < m->size; off += step)
		td_probe(c, c->ours ? m->iova + off : at);
	gone = iommu_unmap(c->domain, m->iova, m->size);
	for (off = 0; off < m->size; off += step, probes++)
		faults += td_probe(c, c->ours ? m->iova + off : at) == TD_TX_FAIL;
	snprintf(name, sizeof(name), "unmap-%s", m->name);
	RESULT(name, gone == m->size && faults == probes,
	       "iova=0x%llx size=0x%llx unmapped=0x%zx faulted=%llu/%llu fault-iova=0x%llx",
	       m->iova, m->size, gone, faults, probes, at);
}

static void check_paging(struct ctx *c)
{
	struct mapping maps[] = {
		{ "4k", 0x10000000, SZ_4K },
		{ "64k", 0x20000000, SZ_64K },
		{ "2m", 0x40000000, SZ_2M },
		{ "1g", 0x80000000, SZ_1G },
		{ "top", 0, SZ_4K },
	};
	struct mapping nl = { "nl", 0x60000000, SZ_2M };
	u64 *dc, at;
	u32 result;
	int err, i;
	bool ok;

	if (new_domain(c, "paging-domain-alloc"))
		return;
	maps[4].iova = (c->domain->geometry.aperture_end + 1 - SZ_4K) & ~(u64)(SZ_4K - 1);
	err = attach_with(c, 0, 0, 0, 0);
	dc = device_context(c);
	RESULT("paging-attach", !err && dc, "err=%d mode=%s pscid=%llu aperture_end=0x%llx",
	       err, dc ? mode_name(READ_ONCE(dc[DC_FSC]) >> 60) : "?",
	       dc ? (READ_ONCE(dc[DC_TA]) >> 12) & 0xfffff : 0,
	       (u64)c->domain->geometry.aperture_end);
	if (err)
		goto out;

	for (i = 0; i < ARRAY_SIZE(maps); i++)
		check_mapping(c, &maps[i]);
	for (i = 0; i < ARRAY_SIZE(maps); i++)
		check_unmap(c, &maps[i]);

	/* The same IOVA, now onto page b: the next DMA lands there. */
	err = iommu_map(c->domain, maps[0].iova, page_to_phys(c->b), SZ_4K,
			IOMMU_READ | IOMMU_WRITE, GFP_KERNEL);
	ok = !err && td_write(c, maps[0].iova, c->b, &result);
	RESULT("remap-4k", ok, "iova=0x%llx err=%d write=0x%x", maps[0].iova, err,
	       err ? 0 : result);
	iommu_unmap(c->domain, maps[0].iova, SZ_4K);

	/* A 2 MiB leaf replacing an emptied level-0 table: a non-leaf change (NL). */
	iommu_map(c->domain, nl.iova, page_to_phys(c->a), SZ_4K, IOMMU_READ | IOMMU_WRITE,
		  GFP_KERNEL);
	td_write(c, nl.iova, c->a, &result);
	iommu_unmap(c->domain, nl.iova, SZ_4K);
	at = map_around(c, &nl, c->b, &err);
	ok = !err && td_write(c, at, c->b, &result);
	RESULT("remap-table-as-2m", ok, "iova=0x%llx err=%d write=0x%x leaf=0x%llx", at, err,
	       err ? 0 : result, debug_leaf_size(c, at));
	iommu_unmap(c->domain, nl.iova, SZ_2M);
	detach_and_clear(c);
out:
	free_domain(c);
}

/* -- msi: MSI page tables, with real Linux interrupts --------------------------------- */

struct msi_irq {
	int irq;
	atomic_t count;
	struct msi_msg msg;
};

static irqreturn_t count_irq(int irq, void *data)
{
	atomic_inc(&((struct msi_irq *)data)->count);
	return IRQ_HANDLED;
}

static bool wait_count(struct msi_irq *m, int want)
{
	int i;

	for (i = 0; i < 200 && atomic_read(&m->count) < want; i++)
		msleep(10);
	return atomic_read(&m->count) >= want;
}

static u64 msi_addr(const struct msi_irq *m)
{
	return (u64)m->msg.address_hi << 32 | m->msg.address_lo;
}

/* The MSI page table's geometry from the IMSIC layout: interrupt-file page numbers
 * differ in their low guest+hart index bits (one group on QEMU's virt). */
static int msi_layout(u64 *mask, u64 *pattern)
{
	const struct imsic_global_config *g = imsic_get_global_config();
	u32 bits;

	if (!g)
		return -ENODEV;
	bits = g->guest_index_bits + g->hart_index_bits;
	if (g->group_index_bits || bits > 8)
		return -EOPNOTSUPP;	/* more than one page of MSI PTEs */
	*mask = BIT_ULL(bits) - 1;
	*pattern = (g->base_addr >> 12) & ~*mask;
	return 0;
}

static u64 msiptp_flat(struct page *pt)
{
	return 1ULL << 60 | page_to_pfn(pt);	/* MODE=Flat */
}

/* Attach with this MSI page table, DMA once with a completion MSI to `irq`'s file and
 * data; return the MSI write's result. */
static u32 dma_with_msi(struct ctx *c, struct page *pt, u64 mask, u64 pattern,
			u64 addr, u32 data, int *err)
{
	u32 result;

	*err = attach_with(c, 0, msiptp_flat(pt), mask, pattern);
	if (*err)
		return 0;
	writel(lower_32_bits(addr), c->bar + TD_MSI_ADDR_LO);
	writel(upper_32_bits(addr), c->bar + TD_MSI_ADDR_HI);
	writel(data, c->bar + TD_MSI_DATA);
	writel(1, c->bar + TD_MSI_CTRL);
	td_write(c, 0x10000000, c->a, &result);
	writel(0, c->bar + TD_MSI_CTRL);
	result = readl(c->bar + TD_MSI_RESULT);
	detach_and_clear(c);
	return result;
}

static void fill_basic(u64 *pte, u64 mask, u64 pattern, u64 extra, bool valid)
{
	u64 i;

	for (i = 0; i <= mask; i++) {
		pte[2 * i] = (valid ? PTE_V : 0) | 3ULL << 1 | (pattern | i) << 10 | extra;
		pte[2 * i + 1] = 0;
	}
}

static void check_msi(struct ctx *c)
{
	const struct imsic_global_config *g = imsic_get_global_config();
	struct msi_irq irqs[2] = {};
	struct page *pts[4] = {}, *pt, *mrif = NULL;
	u64 mask, pattern, *pte, file, i;
	int err, n, before;
	u32 result;

	if (!(c->caps & CAP_MSI_FLAT) || !c->ours) {
		RESULT("msi-flat", 0, "skipped=%s", c->ours ? "no-MSI_FLAT" : "no-testdev-msi");
		return;
	}
	err = msi_layout(&mask, &pattern);
	if (err) {
		RESULT("msi-flat", 0, "imsic-layout=%d", err);
		return;
	}
	n = pci_alloc_irq_vectors(c->tdev, 2, 2, PCI_IRQ_MSIX);
	if (n < 2) {
		RESULT("msi-irqs", 0, "pci_alloc_irq_vectors=%d", n);
		return;
	}
	for (i = 0; i < 2; i++) {
		irqs[i].irq = pci_irq_vector(c->tdev, i);
		err = request_irq(irqs[i].irq, count_irq, 0, "vfiouser-iommu-test", &irqs[i]);
		if (err) {
			RESULT("msi-irqs", 0, "request_irq=%d", err);
			goto free_vectors;
		}
		get_cached_msi_msg(irqs[i].irq, &irqs[i].msg);
	}
	RESULT("msi-irqs", 1, "irq=%d,%d file=0x%llx,0x%llx id=%u,%u imsic=0x%llx mask=0x%llx",
	       irqs[0].irq, irqs[1].irq, msi_addr(&irqs[0]), msi_addr(&irqs[1]),
	       irqs[0].msg.data, irqs[1].msg.data, (u64)g->base_addr, mask);

	if (new_domain(c, "msi-domain"))
		goto free_irqs;
	/* The interrupt files must also pass the first stage: identity-map them. */
	for (i = 0; i <= mask; i++)
		iommu_map(c->domain, (pattern | i) << 12, (pattern | i) << 12, SZ_4K,
			  IOMMU_WRITE | IOMMU_MMIO, GFP_KERNEL);
	iommu_map(c->domain, 0x10000000, page_to_phys(c->a), SZ_4K, IOMMU_READ | IOMMU_WRITE,
		  GFP_KERNEL);
	for (i = 0; i < ARRAY_SIZE(pts); i++)
		pts[i] = alloc_page(GFP_KERNEL | __GFP_ZERO);
	mrif = alloc_page(GFP_KERNEL | __GFP_ZERO);
	if (!pts[0] || !pts[1] || !pts[2] || !pts[3] || !mrif)
		goto free_domain;
	pt = pts[0];
	pte = page_address(pt);
	file = msi_addr(&irqs[0]);

	/* Flat, basic translate: each file page onto itself. */
	fill_basic(pte, mask, pattern, 0, true);
	before = atomic_read(&irqs[0].count);
	result = dma_with_msi(c, pt, mask, pattern, file, irqs[0].msg.data, &err);
	RESULT("msi-flat-delivered", !err && result == TD_OK && wait_count(&irqs[0], before + 1),
	       "file=0x%llx id=%u msi=0x%x count=%d->%d err=%d", file, irqs[0].msg.data, result,
	       before, atomic_read(&irqs[0].count), err);

	/* Each case below gets its own MSI page table page: cached MSI PTEs are tagged by
	 * the table, so no IOTINVAL.GVMA is needed between the cases. */
	{
		static const struct { const char *name; int cause; u64 extra; bool valid; }
		cases[] = {
			{ "msi-pte-invalid", 262, 0, false },
			{ "msi-pte-misconfigured", 263, BIT_ULL(3), true },	/* reserved bit */
		};
		for (i = 0; i < ARRAY_SIZE(cases); i++) {
			pt = pts[1 + i];
			fill_basic(page_address(pt), mask, pattern, cases[i].extra, cases[i].valid);
			before = atomic_read(&irqs[0].count);
			result = dma_with_msi(c, pt, mask, pattern, file, irqs[0].msg.data, &err);
			msleep(100);
			RESULT(cases[i].name, !err && result == TD_TX_FAIL &&
			       atomic_read(&irqs[0].count) == before,
			       "cause=%d iotval=%llx msi=0x%x count=%d->%d err=%d", cases[i].cause,
			       file, result, before, atomic_read(&irqs[0].count), err);
		}
	}

	/* An MSI page table outside RAM (page 0): the PTE load faults (261). */
	{
		err = attach_with(c, 0, 1ULL << 60, mask, pattern);	/* Flat, PPN 0 */
		if (!err) {
			writel(lower_32_bits(file), c->bar + TD_MSI_ADDR_LO);
			writel(upper_32_bits(file), c->bar + TD_MSI_ADDR_HI);
			writel(irqs[0].msg.data, c->bar + TD_MSI_DATA);
			writel(1, c->bar + TD_MSI_CTRL);
			td_write(c, 0x10000000, c->a, &result);
			writel(0, c->bar + TD_MSI_CTRL);
			result = readl(c->bar + TD_MSI_RESULT);
			detach_and_clear(c);
		}
		RESULT("msi-pte-load-fault", !err && result == TD_TX_FAIL,
		       "cause=261 iotval=%llx msi=0x%x err=%d", file, result, err);
	}

	/* MRIF: the file's PTE points at a memory-resident interrupt file; the write sets
	 * its pending bit and the IOMMU sends the notice MSI to the second IRQ's file. */
	if (c->caps & CAP_MSI_MRIF) {
		u64 *mr = page_address(mrif), idx = ((file >> 12) & mask);
		u32 identity = 37, nid = irqs[1].msg.data;
		u64 nppn = msi_addr(&irqs[1]) >> 12;
		int before0 = atomic_read(&irqs[0].count);

		pt = pts[3];
		pte = page_address(pt);
		fill_basic(pte, mask, pattern, 0, true);
		pte[2 * idx] = PTE_V | 1ULL << 1 | (page_to_phys(mrif) >> 9) << 7;
		pte[2 * idx + 1] = (nid & 0x3ff) | nppn << 10 | (u64)((nid >> 10) & 1) << 60;
		before = atomic_read(&irqs[1].count);
		result = dma_with_msi(c, pt, mask, pattern, file, identity, &err);
		RESULT("msi-mrif", !err && result == TD_OK && (READ_ONCE(mr[0]) >> identity & 1) &&
		       wait_count(&irqs[1], before + 1) && atomic_read(&irqs[0].count) == before0,
		       "mrif=0x%llx pending=0x%llx notice=0x%llx nid=%u notices=%d->%d msi=0x%x "
		       "err=%d", (u64)page_to_phys(mrif), READ_ONCE(mr[0]), nppn << 12, nid,
		       before, atomic_read(&irqs[1].count), result, err);
	} else {
		RESULT("msi-mrif", 0, "skipped=no-MSI_MRIF");
	}

free_domain:
	free_domain(c);
	for (i = 0; i < ARRAY_SIZE(pts); i++)
		if (pts[i])
			__free_page(pts[i]);
	if (mrif)
		__free_page(mrif);
free_irqs:
	for (i = 0; i < 2; i++)
		if (irqs[i].irq > 0)
			free_irq(irqs[i].irq, &irqs[i]);
free_vectors:
	pci_free_irq_vectors(c->tdev);
}

/* -- nested: a G-stage written by us under Linux's first stage ------------------------ */

#define WINDOW_GPA	0x100000000ULL		/* 4 GiB: no RAM there (1 GiB guest) */
#define GSCID		1

/* A Sv39x4 or Sv48x4 G-stage: identity 1 GiB leaves over GPA 0-4 GiB, and unless
 * `identity`, a 2 MiB window at 4 GiB onto the 2 MiB-aligned range holding page b. */
static struct page *g_stage(struct ctx *c, int mode, bool identity, struct page **tables)
{
	struct page *root = alloc_pages(GFP_KERNEL | __GFP_ZERO, 2);	/* 16 KiB */
	u64 *r, *l2, *l1, i;

	if (!root)
		return NULL;
	r = page_address(root);
	tables[0] = alloc_page(GFP_KERNEL | __GFP_ZERO);
	tables[1] = alloc_page(GFP_KERNEL | __GFP_ZERO);
	if (!tables[0] || !tables[1])
		return NULL;
	l1 = page_address(tables[1]);
	if (mode == 8) {			/* Sv39x4: the root's entries are 1 GiB */
		l2 = r;
	} else {				/* Sv48x4: root -> one 512 GiB table */
		l2 = page_address(tables[0]);
		r[0] = PTE_V | (page_to_phys(tables[0]) >> 12) << 10;
	}
	for (i = 0; i < 4; i++)
		l2[i] = PTE_LEAF | (i << 18) << 10;
	if (!identity) {
		l2[4] = PTE_V | (page_to_phys(tables[1]) >> 12) << 10;
		l1[0] = PTE_LEAF | (round_down(page_to_phys(c->b), SZ_2M) >> 12) << 10;
	}
	wmb();
	return root;
}

static void check_nested_one(struct ctx *c, int mode, bool identity)
{
	struct page *tables[2] = {}, *root;
	char name[48];
	u64 iova = 0x30000000, at, gpa;
	u32 result, stale;
	bool ok;
	int err;

	snprintf(name, sizeof(name), "nested-%s-%s", mode == 8 ? "sv39x4" : "sv48x4",
		 identity ? "identity" : "window");
	root = g_stage(c, mode, identity, tables);
	if (!root || new_domain(c, name))
		goto out;
	gpa = identity ? page_to_phys(c->a) : WINDOW_GPA + (page_to_phys(c->b) & (SZ_2M - 1));
	err = iommu_map(c->domain, iova, gpa & PAGE_MASK, SZ_4K, IOMMU_READ | IOMMU_WRITE,
			GFP_KERNEL);
	if (!err)
		err = attach_with(c, (u64)mode << 60 | (u64)GSCID << 44 | page_to_pfn(root), 0,
				  0, 0);
	if (err) {
		RESULT(name, 0, "err=%d", err);
		goto out;
	}
	at = iova + offset_in_page(gpa);
	ok = td_write(c, at, identity ? c->a : c->b, &result);
	RESULT(name, ok, "iova=0x%llx gpa=0x%llx spa=0x%llx write=0x%x gscid=%d", at, gpa,
	       (u64)page_to_phys(identity ? c->a : c->b), result, GSCID);

	/* Linux's unmap invalidation has GV=0 (host spaces only): by §4.1.1 the entry
	 * cached for GSCID 1 may survive, and ours does. */
	iommu_unmap(c->domain, iova, SZ_4K);
	td_write(c, at, identity ? c->a : c->b, &stale);
	snprintf(name, sizeof(name), "nested-%s-%s-unmap", mode == 8 ? "sv39x4" : "sv48x4",
		 identity ? "identity" : "window");
	RESULT(name, 1, "after-unmap=%s write=0x%x (GV=0 invalidation leaves GSCID %d)",
	       stale == TD_OK ? "stale-hit" : "fault", stale, GSCID);
	detach_and_clear(c);
out:
	free_domain(c);
	if (root)
		__free_pages(root, 2);
	if (tables[0])
		__free_page(tables[0]);
	if (tables[1])
		__free_page(tables[1]);
}

static void check_nested(struct ctx *c)
{
	if (c->caps & CAP_SV39X4) {
		check_nested_one(c, 8, true);
		check_nested_one(c, 8, false);
	}
	if (c->caps & CAP_SV48X4) {
		check_nested_one(c, 9, true);
		check_nested_one(c, 9, false);
	}
	if (!(c->caps & (CAP_SV39X4 | CAP_SV48X4)))
		RESULT("nested", 0, "skipped=no-Sv39x4/Sv48x4");
}

/* -- bench: DMA through a paging domain (tests/bench/test_bench_guest.py) ------------ */

#define BENCH_ORDER	8			/* 256 pages: 1 MiB */
#define BENCH_IOVA	0x10000000ULL
static unsigned int bench_dmas = 200;
module_param(bench_dmas, uint, 0444);
MODULE_PARM_DESC(bench_dmas, "bench: 4 KiB DMAs timed (a quarter as many 1 MiB ones)");

/* `n` write+verify DMAs of `len` bytes, the k-th at offset k*stride of the mapped MiB;
 * the nanoseconds they took. Failed DMAs are counted in `bad`. */
static u64 bench_run(struct ctx *c, phys_addr_t pa, u32 len, u32 stride, unsigned int n,
		     unsigned int *bad)
{
	u64 start = ktime_get_ns();
	unsigned int k;

	for (k = 0; k < n; k++) {
		u32 off = (k * stride) & (SZ_1M - 1);

		if (td_dma(c, BENCH_IOVA + off, pa + off, len, TD_DIR_WRITE_VERIFY) != TD_OK)
			(*bad)++;
	}
	return ktime_get_ns() - start;
}

/* 1 MiB of guest memory mapped as 256 separate 4 KiB leaves by the driver, then timed
 * testdev DMAs through it: 4 KiB ones (one translation each, a different page each
 * time) and 1 MiB ones (256 translations each), so that the first-stage walk and the
 * IOTLB are on the measured path. */
static void check_bench(struct ctx *c)
{
	struct page *pages = alloc_pages(GFP_KERNEL | __GFP_ZERO, BENCH_ORDER);
	unsigned int bad = 0, n1m = max(bench_dmas / 4, 1u);
	u64 ns4k, ns1m, *dc;
	phys_addr_t pa;
	int err, i;

	if (!pages) {
		RESULT("bench", 0, "err=%d", -ENOMEM);
		return;
	}
	pa = page_to_phys(pages);
	if (new_domain(c, "bench"))
		goto out_pages;
	err = attach_with(c, 0, 0, 0, 0);
	if (err) {
		RESULT("bench", 0, "attach=%d", err);
		goto out_domain;
	}
	for (i = 0; !err && i < 1 << BENCH_ORDER; i++)
		err = iommu_map(c->domain, BENCH_IOVA + i * SZ_4K, pa + i * SZ_4K, SZ_4K,
				IOMMU_READ | IOMMU_WRITE, GFP_KERNEL);
	if (err) {
		RESULT("bench", 0, "iommu_map=%d", err);
		goto out_unmap;
	}
	td_dma(c, BENCH_IOVA, pa, SZ_1M, TD_DIR_WRITE_VERIFY);	/* every page walked once */
	ns4k = bench_run(c, pa, SZ_4K, SZ_4K, bench_dmas, &bad);
	ns1m = bench_run(c, pa, SZ_1M, 0, n1m, &bad);
	dc = device_context(c);
	RESULT("bench", !bad, "mode=%s dmas-4k=%u ns-4k=%llu dmas-1m=%u ns-1m=%llu bad=%u",
	       dc ? mode_name(READ_ONCE(dc[DC_FSC]) >> 60) : "?", bench_dmas, ns4k, n1m, ns1m,
	       bad);
out_unmap:
	iommu_unmap(c->domain, BENCH_IOVA, SZ_1M);
	detach_and_clear(c);
out_domain:
	free_domain(c);
out_pages:
	__free_pages(pages, BENCH_ORDER);
}

/* -- setup ---------------------------------------------------------------------------- */

static struct pci_dev *find_testdev(void)
{
	unsigned int dom, bus, slot, fn;

	if (testdev[0]) {
		if (sscanf(testdev, "%x:%x:%x.%x", &dom, &bus, &slot, &fn) != 4)
			return NULL;
		return pci_get_domain_bus_and_slot(dom, bus, PCI_DEVFN(slot, fn));
	}
	return pci_get_device(0x1b36, 0x0005, NULL);
}

static const struct {
	const char *name;
	void (*run)(struct ctx *c);
} CHECKS[] = {
	{ "alloc", check_alloc },
	{ "paging", check_paging },
	{ "msi", check_msi },
	{ "nested", check_nested },
	{ "bench", check_bench },
};

static bool selected(const char *name)
{
	const char *p = checks;
	size_t n = strlen(name);

	while ((p = strstr(p, name))) {
		if ((p == checks || p[-1] == ',') && (p[n] == ',' || p[n] == '\0'))
			return true;
		p += n;
	}
	return !strcmp(checks, "all") && strcmp(name, "bench");	/* timing: by name only */
}

static int setup(struct ctx *c)
{
	struct iommu_domain *d;
	int err;

	c->tdev = find_testdev();
	c->idev = pci_get_device(0x1b36, 0x0014, NULL);
	if (!c->tdev || !c->idev)
		return -ENODEV;
	c->devid = pci_dev_id(c->tdev);
	err = pci_enable_device(c->tdev);
	if (err)
		return err;
	pci_set_master(c->tdev);
	c->bar = pci_iomap(c->tdev, 0, 0);
	c->regs = pci_iomap(c->idev, 0, 0x1000);
	if (!c->bar || !c->regs)
		return -ENOMEM;
	c->caps = readq(c->regs + R_CAPS);
	/* QEMU's testdev drops writes to the direction register. */
	writel(TD_DIR_READ << 1, c->bar + TD_CTRL);
	c->ours = readl(c->bar + TD_CTRL) == TD_DIR_READ << 1;
	writel(0, c->bar + TD_CTRL);
	c->group = iommu_group_get(&c->tdev->dev);
	if (!c->group)
		return -ENODEV;
	d = iommu_get_domain_for_dev(&c->tdev->dev);
	err = iommu_group_claim_dma_owner(c->group, c);
	if (err)
		return err;
	c->a = alloc_page(GFP_KERNEL | __GFP_ZERO);
	c->b = alloc_page(GFP_KERNEL | __GFP_ZERO);
	if (!c->a || !c->b)
		return -ENOMEM;
	RESULT("setup", 1, "testdev=%s devid=0x%x caps=0x%llx ours=%d default-domain=%s",
	       pci_name(c->tdev), c->devid, c->caps, c->ours,
	       d && d->type == IOMMU_DOMAIN_IDENTITY ? "identity" : "other");
	return 0;
}

static void teardown(struct ctx *c)
{
	if (c->a)
		__free_page(c->a);
	if (c->b)
		__free_page(c->b);
	if (c->group) {
		iommu_group_release_dma_owner(c->group);
		iommu_group_put(c->group);
	}
	if (c->regs)
		pci_iounmap(c->idev, c->regs);
	if (c->bar)
		pci_iounmap(c->tdev, c->bar);
	pci_dev_put(c->tdev);
	pci_dev_put(c->idev);
}

static int __init vfiouser_iommu_test_init(void)
{
	struct ctx c = {};
	int err, i;

	err = setup(&c);
	if (err) {
		RESULT("setup", 0, "err=%d", err);
	} else {
		for (i = 0; i < ARRAY_SIZE(CHECKS); i++)
			if (selected(CHECKS[i].name))
				CHECKS[i].run(&c);
	}
	teardown(&c);
	pr_info("@@KMOD done checks=%s\n", checks);
	return 0;	/* rmmod and insmod again to run more checks */
}

static void __exit vfiouser_iommu_test_exit(void)
{
}

module_init(vfiouser_iommu_test_init);
module_exit(vfiouser_iommu_test_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vfiouser-iommu: guest checks of paging domains, MSI page tables and "
		   "nested translation through Linux's riscv-iommu driver");
