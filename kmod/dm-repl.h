/* SPDX-License-Identifier: GPL-2.0 */
/*
 * dm-repl: internal declarations shared by the target, its metadata code and
 * its ring (the consumer's character device).
 *
 * Locking, in one place:
 *  - rc->lock (spinlock, irqsave) protects the in-core bitmaps, the in-flight
 *    list, the ring indices, the mode and the counters.  Never held across
 *    I/O or copies to and from user space.
 *  - rc->commit_lock (mutex) serialises metadata I/O: the worker's bitmap
 *    commits, CLEAN, messages, preresume and postsuspend.
 *  - repl_targets_lock (mutex) protects the list of live targets and the
 *    binding of a consumer file to a target.
 */
#ifndef DM_REPL_H
#define DM_REPL_H

#include <linux/device-mapper.h>
#include <linux/dm-io.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include "dm-repl-uapi.h"

#define DM_MSG_PREFIX "repl"

#define REPL_DEFAULT_RING_MB 32
#define REPL_MAX_RING_MB 4096
#define REPL_DEFAULT_SYNC_TIMEOUT_MS 5000
#define REPL_MAX_IO_SECTORS 2048	/* bios are split at 1 MiB */
#define REPL_BITS_PER_BLOCK (REPL_META_BLOCK_SIZE * 8)
/*
 * Writes at least this large are copied into the ring by the copy workqueue,
 * on another CPU, while the data device writes them; smaller ones are copied
 * in the submitting context, where a copy costs less than a hand-off.
 */
#define REPL_COPY_OFFLOAD_BYTES (32 * 1024)

/* Per-bio state of a write (per_io_data). */
struct repl_io {
	struct list_head list;		/* rc->inflight, then rc->sync_waiters */
	struct list_head work;		/* rc->deferred or rc->ready */
	struct work_struct copy;	/* the ring copy, when offloaded */
	struct repl_c *rc;
	struct bvec_iter iter;		/* the data, as mapped */
	struct bio *bio;
	u64 data_off;
	sector_t start, end;		/* on the data device; start == end for flush */
	u64 seq;
	unsigned long issued;		/* jiffies, for the sync timeout */
	bool is_write;
	bool needs_commit;		/* waits for its bitmap bits to be durable */
	bool parked;			/* waits for an overlapping earlier write */
	bool held;			/* still being mapped */
	bool in_ring;
	bool copying;			/* the ring copy is not done yet */
	bool write_done;		/* ... but the data device completed */
	bool ack_done;			/* second end_io pass after the ack */
};

struct repl_c {
	struct dm_target *ti;
	struct dm_dev *data_dev;
	struct dm_dev *meta_dev;
	dev_t devt;			/* of the mapped device */
	char *table_args;		/* the table line, for STATUSTYPE_TABLE */
	struct list_head targets;	/* repl_targets */
	struct kref ref;		/* target + attached consumer */
	bool dead;			/* destructor ran */
	bool resumed;
	bool suspended;			/* postsuspend ran; metadata belongs to the next table */
	sector_t sectors;		/* length of the target */

	sector_t chunk_sectors;
	unsigned int chunk_shift;
	u64 nr_chunks;
	unsigned int bitmap_blocks;
	unsigned int sync_timeout_ms;
	unsigned int ring_mb;

	spinlock_t lock;
	/* Bitmaps: dirty = durable intent (may differ from a target);
	 * recent = written since the last mark. */
	unsigned long *dirty;
	unsigned long *recent;
	unsigned long *blocks_dirty;	/* metadata blocks to write */
	unsigned long *blocks_writing;	/* metadata blocks being written */
	u64 nr_dirty;

	struct list_head inflight;	/* entered writes, in seq order */
	struct list_head sync_waiters;	/* completed, waiting for the ack */
	struct list_head deferred;	/* wait for a bitmap commit */
	struct list_head ready;		/* unparked, to submit from the worker */

	/* The ring: descriptors, then data, in one vmalloc_user area. */
	void *ring;
	struct repl_rec *descs;
	u8 *data;
	u64 desc_count;
	u64 desc_bytes;
	u64 data_bytes;
	u64 data_head, data_tail;

	u32 mode;
	u32 reason;
	u32 meta_mode;
	u32 flags;			/* REPL_F_SYNC from the consumer */
	bool consumer;
	bool unclean_start;
	u64 next_seq;
	u64 published;
	u64 acked;
	u64 released;			/* sync writers up to here may complete */
	u64 stream_start;		/* first seq in the ring */
	u64 ring_end;			/* first seq not in the ring */
	u64 mark;
	u64 events;
	u64 writes, write_bytes;
	atomic64_t reads, read_bytes;

	wait_queue_head_t waitq;	/* published, mode, detach */
	u64 wake_at;			/* lowest published a waiter waits for */

	struct workqueue_struct *wq;
	struct workqueue_struct *copy_wq;
	struct work_struct worker;
	struct work_struct event_work;
	struct delayed_work timeout_work;

	struct mutex commit_lock;
	struct dm_io_client *io_client;
	__le64 *image;			/* on-disk form of the bitmap */
	void *sb_block;			/* preallocated: no allocation on the suspend path */
	struct repl_superblock sb;	/* last read or written */
};

/* dm-repl-metadata.c: may sleep; caller holds rc->commit_lock. */
int repl_md_read_superblock(struct repl_c *rc, char **error);
int repl_md_load_bitmap(struct repl_c *rc);
int repl_md_commit(struct repl_c *rc);
int repl_md_write_superblock(struct repl_c *rc, bool clean);
int repl_md_alloc(struct repl_c *rc);
void repl_md_free(struct repl_c *rc);

/* dm-repl-target.c */
void repl_raise_event(struct repl_c *rc);			/* rc->lock held */
void repl_set_mode(struct repl_c *rc, u32 mode, u32 reason);	/* rc->lock held */
void repl_release_sync_waiters(struct repl_c *rc, u64 upto, struct list_head *out);
void repl_complete_list(struct list_head *ios);
void repl_get(struct repl_c *rc);
void repl_put(struct repl_c *rc);
struct repl_c *repl_find_target(dev_t devt);	/* repl_targets_lock held */
extern struct mutex repl_targets_lock;

/* dm-repl-ring.c */
int repl_ring_alloc(struct repl_c *rc);
void repl_ring_free(struct repl_c *rc);
void repl_ring_reset(struct repl_c *rc);			/* rc->lock held */
int repl_ring_reserve(struct repl_c *rc, u64 seq, u32 len, u64 *off); /* rc->lock held */
void repl_ring_consumed(struct repl_c *rc);			/* rc->lock held */
u64 repl_ring_used(struct repl_c *rc);				/* rc->lock held */
bool repl_should_wake(struct repl_c *rc);			/* rc->lock held */
int repl_misc_register(void);
void repl_misc_deregister(void);

static inline u64 repl_chunk(struct repl_c *rc, sector_t s)
{
	return s >> rc->chunk_shift;
}

#endif
