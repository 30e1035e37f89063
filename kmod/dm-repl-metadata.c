// SPDX-License-Identifier: GPL-2.0
/*
 * dm-repl metadata: the superblock and the persistent dirty bitmap.
 *
 * Layout (dm-repl-uapi.h): block 0 is the superblock, blocks 1.. hold the
 * bitmap, one bit per chunk, little-endian 64-bit words.  The metadata device
 * is formatted by user space (repctl create-md); this file only validates
 * and updates it.
 *
 * Every function here may sleep and must be called with rc->commit_lock held
 * (except repl_md_alloc/repl_md_free, which run in ctr/dtr).
 */
#include <linux/crc32.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/bitmap.h>
#include <linux/ktime.h>

#include "dm-repl.h"

static int md_io(struct repl_c *rc, blk_opf_t opf, void *buf,
		 sector_t block, unsigned int nr_blocks)
{
	struct dm_io_region where = {
		.bdev = rc->meta_dev->bdev,
		.sector = block * (REPL_META_BLOCK_SIZE >> SECTOR_SHIFT),
		.count = nr_blocks * (REPL_META_BLOCK_SIZE >> SECTOR_SHIFT),
	};
	struct dm_io_request req = {
		.bi_opf = opf,
		.mem.type = is_vmalloc_addr(buf) ? DM_IO_VMA : DM_IO_KMEM,
		.mem.ptr.addr = buf,
		.mem.ptr.vma = buf,
		.notify.fn = NULL,
		.client = rc->io_client,
	};
	unsigned long error_bits = 0;
	int r;

	r = dm_io(&req, 1, &where, &error_bits, IOPRIO_DEFAULT);
	if (!r && error_bits)
		r = -EIO;
	return r;
}

static u32 sb_csum(const void *block)
{
	/* zlib's crc32 of bytes 4..end, so user space computes it with zlib */
	return crc32_le(~0U, (const u8 *)block + 4, REPL_META_BLOCK_SIZE - 4) ^ ~0U;
}

int repl_md_alloc(struct repl_c *rc)
{
	size_t longs = BITS_TO_LONGS(rc->nr_chunks);

	rc->dirty = kvcalloc(longs, sizeof(long), GFP_KERNEL);
	rc->recent = kvcalloc(longs, sizeof(long), GFP_KERNEL);
	rc->image = vzalloc((size_t)rc->bitmap_blocks * REPL_META_BLOCK_SIZE);
	rc->blocks_dirty = bitmap_zalloc(rc->bitmap_blocks, GFP_KERNEL);
	rc->blocks_writing = bitmap_zalloc(rc->bitmap_blocks, GFP_KERNEL);
	rc->sb_block = kzalloc(REPL_META_BLOCK_SIZE, GFP_KERNEL);
	rc->io_client = dm_io_client_create();
	if (IS_ERR(rc->io_client)) {
		rc->io_client = NULL;
		return -ENOMEM;
	}
	if (!rc->dirty || !rc->recent || !rc->image || !rc->blocks_dirty ||
	    !rc->blocks_writing || !rc->sb_block)
		return -ENOMEM;
	return 0;
}

void repl_md_free(struct repl_c *rc)
{
	if (rc->io_client)
		dm_io_client_destroy(rc->io_client);
	kvfree(rc->dirty);
	kvfree(rc->recent);
	vfree(rc->image);
	bitmap_free(rc->blocks_dirty);
	bitmap_free(rc->blocks_writing);
	kfree(rc->sb_block);
}

/*
 * Read and validate the superblock against the table.  On failure *error is
 * a static text for ti->error.
 */
int repl_md_read_superblock(struct repl_c *rc, char **error)
{
	struct repl_superblock *sb;
	u8 *block;
	sector_t meta_sectors;
	int r;

	meta_sectors = bdev_nr_sectors(rc->meta_dev->bdev);
	if (meta_sectors < (1 + rc->bitmap_blocks) * (REPL_META_BLOCK_SIZE >> SECTOR_SHIFT)) {
		*error = "Metadata device too small for the bitmap";
		return -EINVAL;
	}

	block = rc->sb_block;
	r = md_io(rc, REQ_OP_READ, block, 0, 1);
	if (r) {
		*error = "Cannot read metadata superblock";
		goto out;
	}

	r = -EINVAL;
	sb = (struct repl_superblock *)block;
	if (!memchr_inv(block, 0, REPL_META_BLOCK_SIZE)) {
		*error = "Metadata device is not formatted";
		goto out;
	}
	if (le32_to_cpu(sb->magic) != REPL_SB_MAGIC) {
		*error = "Metadata device is not dm-repl metadata (bad magic)";
		goto out;
	}
	if (le32_to_cpu(sb->csum) != sb_csum(block)) {
		*error = "Metadata superblock checksum mismatch";
		goto out;
	}
	if (le32_to_cpu(sb->version) != REPL_META_VERSION) {
		*error = "Unsupported metadata version";
		goto out;
	}
	if (le64_to_cpu(sb->data_sectors) != rc->ti->len) {
		*error = "Metadata was formatted for a device of another size";
		goto out;
	}
	if (le32_to_cpu(sb->chunk_sectors) != rc->chunk_sectors) {
		*error = "Metadata was formatted with another chunk size";
		goto out;
	}
	if (le64_to_cpu(sb->nr_chunks) != rc->nr_chunks ||
	    le32_to_cpu(sb->bitmap_blocks) != rc->bitmap_blocks) {
		*error = "Metadata bitmap geometry is inconsistent";
		goto out;
	}
	memcpy(&rc->sb, sb, sizeof(rc->sb));
	r = 0;
out:
	return r;
}

/* Replace the in-core dirty bitmap by the on-disk one. */
int repl_md_load_bitmap(struct repl_c *rc)
{
	u64 *words = (u64 *)rc->image;
	size_t i, nwords = (size_t)rc->bitmap_blocks * REPL_META_BLOCK_SIZE / 8;
	unsigned long flags;
	int r;

	r = md_io(rc, REQ_OP_READ, rc->image, REPL_BITMAP_START_BLOCK, rc->bitmap_blocks);
	if (r)
		return r;
	for (i = 0; i < nwords; i++)
		words[i] = le64_to_cpu(rc->image[i]);

	spin_lock_irqsave(&rc->lock, flags);
	bitmap_from_arr64(rc->dirty, words, rc->nr_chunks);
	rc->nr_dirty = bitmap_weight(rc->dirty, rc->nr_chunks);
	bitmap_zero(rc->blocks_dirty, rc->bitmap_blocks);
	spin_unlock_irqrestore(&rc->lock, flags);

	/* keep rc->image in on-disk form: it is what the next commit writes */
	for (i = 0; i < nwords; i++)
		rc->image[i] = cpu_to_le64(words[i]);
	return 0;
}

/*
 * Write every bitmap block that changed since the last commit, with FUA.
 * Returns 0 when the bits set before the call are durable.  A failure puts
 * the target's metadata in fail mode (the caller raises the event).
 */
int repl_md_commit(struct repl_c *rc)
{
	unsigned int b, start, end, built = 0;
	unsigned long flags;
	int r = 0;

	spin_lock_irqsave(&rc->lock, flags);
	if (rc->meta_mode == REPL_META_FAIL) {
		/* the in-core bitmap may be incomplete: never write it over the disk */
		spin_unlock_irqrestore(&rc->lock, flags);
		return -EIO;
	}
	bitmap_copy(rc->blocks_writing, rc->blocks_dirty, rc->bitmap_blocks);
	bitmap_zero(rc->blocks_dirty, rc->bitmap_blocks);
	for_each_set_bit(b, rc->blocks_writing, rc->bitmap_blocks) {
		u64 first = (u64)b * REPL_BITS_PER_BLOCK;
		u64 nbits = min_t(u64, REPL_BITS_PER_BLOCK, rc->nr_chunks - first);
		__le64 *dst = rc->image + first / 64;
		size_t w;

		memset(dst, 0, REPL_META_BLOCK_SIZE);
		bitmap_to_arr64((u64 *)dst, rc->dirty + first / BITS_PER_LONG, nbits);
		for (w = 0; w < DIV_ROUND_UP(nbits, 64); w++)
			dst[w] = cpu_to_le64(((u64 *)dst)[w]);
		if (!(++built % 64)) {
			/*
			 * Every block may be dirty (mark_dirty of the whole device):
			 * let interrupts and the CPU in.  A bit set meanwhile marks its
			 * block dirty again for the next commit, and a write waiting
			 * for it sees the block writing; only CLEAN clears bits, and
			 * it holds commit_lock, as we do.
			 */
			spin_unlock_irqrestore(&rc->lock, flags);
			cond_resched();
			spin_lock_irqsave(&rc->lock, flags);
		}
	}
	spin_unlock_irqrestore(&rc->lock, flags);

	/* write runs of consecutive blocks */
	for_each_set_bitrange(start, end, rc->blocks_writing, rc->bitmap_blocks) {
		r = md_io(rc, REQ_OP_WRITE | REQ_SYNC | REQ_FUA,
			  (u8 *)rc->image + (size_t)start * REPL_META_BLOCK_SIZE,
			  REPL_BITMAP_START_BLOCK + start, end - start);
		if (r)
			break;
	}

	spin_lock_irqsave(&rc->lock, flags);
	if (r) {
		/* not durable: they must be written again */
		bitmap_or(rc->blocks_dirty, rc->blocks_dirty, rc->blocks_writing,
			  rc->bitmap_blocks);
		rc->meta_mode = REPL_META_FAIL;
		repl_raise_event(rc);
	}
	bitmap_zero(rc->blocks_writing, rc->bitmap_blocks);
	spin_unlock_irqrestore(&rc->lock, flags);
	if (r)
		DMERR("bitmap commit failed (%d): metadata now in fail mode", r);
	return r;
}

int repl_md_write_superblock(struct repl_c *rc, bool clean)
{
	u8 *block = rc->sb_block;
	struct repl_superblock *sb;
	int r;

	memset(block, 0, REPL_META_BLOCK_SIZE);
	sb = (struct repl_superblock *)block;
	memcpy(sb, &rc->sb, sizeof(*sb));
	if (clean)
		sb->flags = cpu_to_le32(le32_to_cpu(sb->flags) | REPL_SB_CLEAN);
	else {
		sb->flags = cpu_to_le32(le32_to_cpu(sb->flags) & ~REPL_SB_CLEAN);
		le64_add_cpu(&sb->mount_count, 1);
	}
	sb->csum = cpu_to_le32(sb_csum(block));
	r = md_io(rc, REQ_OP_WRITE | REQ_SYNC | REQ_FUA, block, 0, 1);
	if (!r)
		memcpy(&rc->sb, sb, sizeof(*sb));
	return r;
}
