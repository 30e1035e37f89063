// SPDX-License-Identifier: GPL-2.0
/*
 * dm-repl: the write side of block-level replication.
 *
 * Every write, flush, discard and write-zeroes that enters the target takes a
 * sequence number (seq) and is, in this order:
 *
 *  1. checked against earlier writes still in flight: an overlapping one
 *     makes it wait ("parked"), so that seq order and disk order agree;
 *  2. marked in the dirty bitmap; if a bit was not yet durable the write
 *     waits for the worker to commit the bitmap ("needs_commit");
 *  3. copied into the ring (streaming mode) or only tracked in the bitmap
 *     (tracking mode, or when the ring is full);
 *  4. passed to the data device.
 *
 * Records are published to the consumer in seq order, each only once it and
 * every earlier write completed on the data device.  In synchronous mode the
 * bio completes only once the consumer acknowledged its record, or after the
 * sync timeout, when the target falls back to tracking.  Dirty bits are
 * cleared only by the consumer's CLEAN, for chunks not written since its
 * MARK.  See docs/dm-repl.rst.
 */
#include <linux/module.h>
#include <linux/init.h>
#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/bitmap.h>
#include <linux/kobject.h>

#include "dm-repl.h"

static LIST_HEAD(repl_targets);
DEFINE_MUTEX(repl_targets_lock);

static const char *const mode_names[] = {
	[REPL_MODE_TRACKING] = "tracking",
	[REPL_MODE_STREAMING] = "streaming",
};

static const char *const reason_names[] = {
	[REPL_REASON_NONE] = "none",
	[REPL_REASON_NO_CONSUMER] = "no_consumer",
	[REPL_REASON_ATTACHED] = "attached",
	[REPL_REASON_RING_FULL] = "ring_full",
	[REPL_REASON_SYNC_TIMEOUT] = "sync_timeout",
	[REPL_REASON_DETACHED] = "detached",
	[REPL_REASON_MESSAGE] = "message",
	[REPL_REASON_STARTED] = "started",
	[REPL_REASON_IO_ERROR] = "io_error",
};

/*----------------------------------------------------------------
 * Reference counting: the target holds one reference, an attached
 * consumer file another; the memory (ring included) lives until both
 * are gone.
 *--------------------------------------------------------------*/
static void repl_free(struct kref *ref)
{
	struct repl_c *rc = container_of(ref, struct repl_c, ref);

	repl_ring_free(rc);
	repl_md_free(rc);
	kfree(rc->table_args);
	kfree(rc);
}

void repl_get(struct repl_c *rc)
{
	kref_get(&rc->ref);
}

void repl_put(struct repl_c *rc)
{
	kref_put(&rc->ref, repl_free);
}

struct repl_c *repl_find_target(dev_t devt)
{
	struct repl_c *rc, *found = NULL;

	list_for_each_entry(rc, &repl_targets, targets) {
		if (rc->devt != devt || rc->dead)
			continue;
		/* during a table reload prefer the live instance */
		if (!found || rc->resumed)
			found = rc;
	}
	return found;
}

/*----------------------------------------------------------------
 * Mode changes and events
 *--------------------------------------------------------------*/
static const char *reason_name(u32 reason)
{
	return reason < ARRAY_SIZE(reason_names) ? reason_names[reason] : "unknown";
}

static void event_work(struct work_struct *ws)
{
	struct repl_c *rc = container_of(ws, struct repl_c, event_work);
	struct mapped_device *md = dm_table_get_md(rc->ti->table);
	char mode_env[32], reason_env[40], event_env[40];
	char *envp[] = { mode_env, reason_env, event_env, NULL };
	unsigned long flags;
	u32 mode, reason, meta;
	u64 events;

	spin_lock_irqsave(&rc->lock, flags);
	mode = rc->mode;
	reason = rc->reason;
	meta = rc->meta_mode;
	events = rc->events;
	spin_unlock_irqrestore(&rc->lock, flags);

	snprintf(mode_env, sizeof(mode_env), "DM_REPL_MODE=%s",
		 meta == REPL_META_FAIL ? "fail" : mode_names[mode]);
	snprintf(reason_env, sizeof(reason_env), "DM_REPL_REASON=%s", reason_name(reason));
	snprintf(event_env, sizeof(event_env), "DM_REPL_EVENT=%llu", events);

	dm_table_event(rc->ti->table);
	kobject_uevent_env(&disk_to_dev(dm_disk(md))->kobj, KOBJ_CHANGE, envp);
}

/*
 * rc->lock held.  Raises a dm event and a uevent from process context, on
 * the system workqueue so that slow metadata I/O in our worker cannot delay
 * it (nor the sync timeout).
 */
void repl_raise_event(struct repl_c *rc)
{
	rc->events++;
	wake_up_all(&rc->waitq);
	if (!rc->dead)
		schedule_work(&rc->event_work);
}

/* rc->lock held */
void repl_set_mode(struct repl_c *rc, u32 mode, u32 reason)
{
	if (rc->mode == mode && rc->reason == reason)
		return;
	rc->mode = mode;
	rc->reason = reason;
	repl_raise_event(rc);
}

/*----------------------------------------------------------------
 * Completion of synchronous writes
 *--------------------------------------------------------------*/

/* rc->lock held: move sync waiters with seq <= upto to out. */
void repl_release_sync_waiters(struct repl_c *rc, u64 upto, struct list_head *out)
{
	struct repl_io *io, *tmp;

	list_for_each_entry_safe(io, tmp, &rc->sync_waiters, list) {
		if (io->seq <= upto)
			list_move_tail(&io->list, out);
	}
}

void repl_complete_list(struct list_head *ios)
{
	struct repl_io *io, *tmp;

	list_for_each_entry_safe(io, tmp, ios, list) {
		list_del_init(&io->list);
		io->ack_done = true;
		bio_endio(io->bio);	/* back through end_io, which now returns DONE */
	}
}

/* rc->lock held: stop waiting for acks, fall behind into tracking. */
static void fall_behind(struct repl_c *rc, u32 reason, struct list_head *release)
{
	repl_set_mode(rc, REPL_MODE_TRACKING, reason);
	repl_release_sync_waiters(rc, U64_MAX, release);
}

static void timeout_work(struct work_struct *ws)
{
	struct repl_c *rc = container_of(to_delayed_work(ws), struct repl_c, timeout_work);
	unsigned long flags, timeout = msecs_to_jiffies(rc->sync_timeout_ms);
	struct repl_io *oldest;
	LIST_HEAD(release);
	bool again = false;

	spin_lock_irqsave(&rc->lock, flags);
	oldest = list_first_entry_or_null(&rc->sync_waiters, struct repl_io, list);
	if (oldest && time_after_eq(jiffies, oldest->issued + timeout)) {
		DMWARN("%u:%u: no acknowledgement for seq %llu within %u ms: tracking",
		       MAJOR(rc->devt), MINOR(rc->devt), oldest->seq, rc->sync_timeout_ms);
		fall_behind(rc, REPL_REASON_SYNC_TIMEOUT, &release);
	} else if (oldest) {
		again = true;
	}
	spin_unlock_irqrestore(&rc->lock, flags);

	repl_complete_list(&release);
	if (again)
		schedule_delayed_work(&rc->timeout_work, HZ / 10);
}

/*----------------------------------------------------------------
 * The write path
 *--------------------------------------------------------------*/
static bool overlaps(struct repl_io *a, struct repl_io *b)
{
	return a->start < b->end && b->start < a->end;
}

/* rc->lock held: does an earlier in-flight write overlap io? */
static bool blocked(struct repl_c *rc, struct repl_io *io)
{
	struct repl_io *e;

	if (io->start == io->end)
		return false;
	list_for_each_entry(e, &rc->inflight, list) {
		if (e == io)
			return false;
		if (overlaps(e, io))
			return true;
	}
	return false;
}

/*
 * rc->lock held: set the dirty bits of chunks [first, end), which lie in one
 * metadata block; count the new ones and mark the block for the next commit.
 * Word at a time: its cost is bounded by the block's 512 words, not by its
 * 32768 chunks.
 */
static void set_dirty(struct repl_c *rc, u64 first, u64 end)
{
	unsigned long *words = rc->dirty + BIT_WORD(first);
	unsigned int start = first % BITS_PER_LONG, nbits = end - first;
	unsigned int span = round_up(start + nbits, BITS_PER_LONG);
	unsigned int before = bitmap_weight(words, span), added;

	bitmap_set(words, start, nbits);
	added = bitmap_weight(words, span) - before;
	if (added) {
		rc->nr_dirty += added;
		__set_bit(first / REPL_BITS_PER_BLOCK, rc->blocks_dirty);
	}
}

/*
 * rc->lock held: mark the chunks of io dirty (and recent).  Returns true if
 * the write must wait for a bitmap commit: one of its bits was new, or sits
 * in a block that is waiting to be written or being written.  Works a
 * metadata block at a time, so a discard of millions of chunks costs
 * words, not chunks.
 */
static bool mark_dirty(struct repl_c *rc, struct repl_io *io)
{
	u64 first, end, next, b;
	bool wait = false;

	if (io->start == io->end)
		return false;
	first = repl_chunk(rc, io->start);
	end = repl_chunk(rc, io->end - 1) + 1;
	for (; first < end; first = next) {
		b = first / REPL_BITS_PER_BLOCK;
		next = min(end, (b + 1) * REPL_BITS_PER_BLOCK);
		bitmap_set(rc->recent + BIT_WORD(first), first % BITS_PER_LONG, next - first);
		set_dirty(rc, first, next);
		if (test_bit(b, rc->blocks_dirty) || test_bit(b, rc->blocks_writing))
			wait = true;
	}
	return wait;
}

/*
 * Copy the write's data into its ring space, as mapped: the data device may
 * advance bio->bi_iter meanwhile.
 */
static void copy_bio_data(struct repl_c *rc, struct repl_io *io)
{
	u8 *dst = rc->data + io->data_off;
	struct bvec_iter iter;
	struct bio_vec bv;

	__bio_for_each_segment(bv, io->bio, iter, io->iter) {
		memcpy_from_bvec((char *)dst, &bv);
		dst += bv.bv_len;
	}
}

/*
 * The copy workqueue: copy one write into its reserved ring space.  If the
 * data device completed the write meanwhile, end_io deferred it: end the bio
 * again, and end_io now publishes it.
 */
static void copy_work(struct work_struct *ws)
{
	struct repl_io *io = container_of(ws, struct repl_io, copy);
	struct repl_c *rc = io->rc;
	unsigned long flags;
	bool done;

	copy_bio_data(rc, io);
	spin_lock_irqsave(&rc->lock, flags);
	io->copying = false;
	done = io->write_done;
	spin_unlock_irqrestore(&rc->lock, flags);
	if (done)
		bio_endio(io->bio);
}

static u16 rec_op(struct bio *bio)
{
	switch (bio_op(bio)) {
	case REQ_OP_DISCARD:
		return REPL_OP_DISCARD;
	case REQ_OP_WRITE_ZEROES:
		return REPL_OP_WRITE_ZEROES;
	default:
		return bio_sectors(bio) ? REPL_OP_WRITE : REPL_OP_FLUSH;
	}
}

static void submit_io(struct repl_io *io)
{
	dm_submit_bio_remap(io->bio, NULL);
}

/* The slot is ours: fill it, and copy the data or have it copied. */
static void fill_record(struct repl_c *rc, struct repl_io *io, struct bio *bio,
			u16 op, u64 off, u32 data_len)
{
	struct repl_rec *rec = &rc->descs[io->seq % rc->desc_count];

	rec->seq = io->seq;
	rec->sector = io->start;
	rec->len = bio->bi_iter.bi_size;
	rec->op = op;
	rec->flags = (bio->bi_opf & REQ_FUA) ? REPL_REC_FUA : 0;
	rec->data_off = off;
	rec->data_len = data_len;
	rec->pad = 0;
	memset(rec->reserved, 0, sizeof(rec->reserved));
	if (!data_len)
		return;
	io->iter = bio->bi_iter;
	io->data_off = off;
	if (data_len < REPL_COPY_OFFLOAD_BYTES) {
		copy_bio_data(rc, io);
		return;
	}
	io->copying = true;	/* before the data device can complete it */
	queue_work(rc->copy_wq, &io->copy);
}

/*
 * rc->lock held, io fully prepared: hand it to the worker for a bitmap
 * commit, leave it parked, or let the caller remap it now.
 */
static int dispatch(struct repl_c *rc, struct repl_io *io)
{
	io->held = false;
	io->parked = blocked(rc, io);
	if (io->needs_commit) {
		list_add_tail(&io->work, &rc->deferred);
		queue_work(rc->wq, &rc->worker);
		return DM_MAPIO_SUBMITTED;
	}
	return io->parked ? DM_MAPIO_SUBMITTED : DM_MAPIO_REMAPPED;
}

static int repl_map_write(struct repl_c *rc, struct bio *bio)
{
	struct repl_io *io = dm_per_bio_data(bio, sizeof(struct repl_io));
	u16 op = rec_op(bio);
	u32 len = bio->bi_iter.bi_size;
	u32 data_len = op == REPL_OP_WRITE ? len : 0;
	LIST_HEAD(release);
	unsigned long flags;
	u64 off = 0;
	int r;

	INIT_LIST_HEAD(&io->work);
	INIT_WORK(&io->copy, copy_work);
	io->rc = rc;
	io->bio = bio;
	io->is_write = true;
	io->ack_done = false;
	io->in_ring = false;
	io->copying = false;
	io->write_done = false;
	io->held = true;	/* neither unparked nor submitted until mapped */
	io->parked = false;
	io->start = bio->bi_iter.bi_sector;
	io->end = op == REPL_OP_FLUSH ? io->start : bio_end_sector(bio);

	spin_lock_irqsave(&rc->lock, flags);
	if (rc->meta_mode == REPL_META_FAIL) {
		spin_unlock_irqrestore(&rc->lock, flags);
		return DM_MAPIO_KILL;
	}
	io->seq = rc->next_seq++;
	list_add_tail(&io->list, &rc->inflight);
	io->needs_commit = mark_dirty(rc, io);
	rc->writes++;
	rc->write_bytes += len;

	if (rc->mode == REPL_MODE_STREAMING) {
		if (io->seq - rc->acked > rc->desc_count ||
		    repl_ring_reserve(rc, io->seq, data_len, &off))
			fall_behind(rc, REPL_REASON_RING_FULL, &release);
		else
			io->in_ring = true;
	}
	if (!io->in_ring) {
		r = dispatch(rc, io);
		spin_unlock_irqrestore(&rc->lock, flags);
		/* waiters released by fall_behind are completed bios, never io */
		repl_complete_list(&release);
		return r;
	}
	spin_unlock_irqrestore(&rc->lock, flags);

	/* published only once the write and its copy completed */
	fill_record(rc, io, bio, op, off, data_len);

	spin_lock_irqsave(&rc->lock, flags);
	r = dispatch(rc, io);
	spin_unlock_irqrestore(&rc->lock, flags);
	return r;
}

static int repl_map(struct dm_target *ti, struct bio *bio)
{
	struct repl_c *rc = ti->private;
	struct repl_io *io = dm_per_bio_data(bio, sizeof(struct repl_io));

	/*
	 * Not max_io_len: dm would cap it by the device's max_sectors and split
	 * every large write (9 bios, 9 records per 1 MiB on a RAM disk).  Only a
	 * record's data must fit the ring; dm maps the rest as a new bio.
	 */
	if (bio_op(bio) == REQ_OP_WRITE && bio_sectors(bio) > REPL_MAX_IO_SECTORS)
		dm_accept_partial_bio(bio, REPL_MAX_IO_SECTORS);

	bio_set_dev(bio, rc->data_dev->bdev);
	if (bio_sectors(bio))
		bio->bi_iter.bi_sector = dm_target_offset(ti, bio->bi_iter.bi_sector);

	if (bio_data_dir(bio) == READ) {
		io->is_write = false;
		atomic64_inc(&rc->reads);
		atomic64_add(bio->bi_iter.bi_size, &rc->read_bytes);
		return DM_MAPIO_REMAPPED;
	}
	return repl_map_write(rc, bio);
}

/* rc->lock held: queue parked writes that no earlier write blocks now. */
static bool unpark(struct repl_c *rc)
{
	struct repl_io *io;
	bool any = false;

	list_for_each_entry(io, &rc->inflight, list) {
		if (!io->parked || io->held || blocked(rc, io))
			continue;
		io->parked = false;
		if (!io->needs_commit) {
			list_add_tail(&io->work, &rc->ready);
			any = true;
		}
	}
	return any;
}

/*
 * rc->lock held; io, in the ring, failed on the data device and has just
 * left the in-flight list, so no consumer can have read its record yet
 * (published was below its seq).  The record never reaches a target as the
 * operation it was: it becomes a NOOP without data.
 *
 * An unsupported discard or write-zeroes changed nothing (the caller may fall
 * back to writes): the stream goes on past the NOOP.  Any other failure may
 * have left anything in the chunks, which stay dirty: the ring ends before
 * the record, so that a consumer reads the writes up to the failure, in
 * order, and the target falls behind (reason io_error), also when it was
 * already tracking; a resync then copies what the device really holds.
 */
static void drop_failed_record(struct repl_c *rc, struct repl_io *io, blk_status_t error,
			       struct list_head *release)
{
	struct repl_rec *rec = &rc->descs[io->seq % rc->desc_count];
	enum req_op op = bio_op(io->bio);

	rec->op = REPL_OP_NOOP;
	rec->data_len = 0;	/* data_off stays: it tells the ring's tail */
	if (error == BLK_STS_NOTSUPP && (op == REQ_OP_DISCARD || op == REQ_OP_WRITE_ZEROES))
		return;
	rc->ring_end = min(rc->ring_end, io->seq);
	fall_behind(rc, REPL_REASON_IO_ERROR, release);
}

static int repl_end_io(struct dm_target *ti, struct bio *bio, blk_status_t *error)
{
	struct repl_c *rc = ti->private;
	struct repl_io *io = dm_per_bio_data(bio, sizeof(struct repl_io));
	struct repl_io *head;
	unsigned long flags;
	LIST_HEAD(release);
	bool kick = false, wait_ack = false, wake;

	if (!io->is_write || io->ack_done)
		return DM_ENDIO_DONE;

	/*
	 * The data device was as fast as the copy worker: if the copy has not
	 * started, take it back and do it here rather than wait for a wake-up
	 * (not in interrupt context, where a slow device completes anyway long
	 * after the copy).
	 */
	if (in_task() && READ_ONCE(io->copying) && cancel_work(&io->copy)) {
		copy_bio_data(rc, io);
		WRITE_ONCE(io->copying, false);
	}

	spin_lock_irqsave(&rc->lock, flags);
	if (io->copying) {
		/* copy_work ends the bio again once its record is complete */
		io->write_done = true;
		spin_unlock_irqrestore(&rc->lock, flags);
		return DM_ENDIO_INCOMPLETE;
	}
	list_del_init(&io->list);
	if (*error && io->in_ring)
		drop_failed_record(rc, io, *error, &release);
	head = list_first_entry_or_null(&rc->inflight, struct repl_io, list);
	rc->published = head ? head->seq - 1 : rc->next_seq - 1;
	kick = unpark(rc);

	if (io->in_ring && rc->mode == REPL_MODE_STREAMING &&
	    (rc->flags & REPL_F_SYNC) && io->seq > max(rc->acked, rc->released) && !*error) {
		io->issued = jiffies;
		if (list_empty(&rc->sync_waiters) && !rc->dead)
			schedule_delayed_work(&rc->timeout_work,
					      msecs_to_jiffies(rc->sync_timeout_ms));
		list_add_tail(&io->list, &rc->sync_waiters);
		wait_ack = true;
	}
	wake = repl_should_wake(rc);
	spin_unlock_irqrestore(&rc->lock, flags);

	repl_complete_list(&release);
	if (wake)
		wake_up_all(&rc->waitq);
	if (kick)
		queue_work(rc->wq, &rc->worker);
	return wait_ack ? DM_ENDIO_INCOMPLETE : DM_ENDIO_DONE;
}

/*
 * The worker: commit the bitmap for deferred writes, then submit them
 * (unless parked), and submit writes that were unparked.
 */
static void do_worker(struct work_struct *ws)
{
	struct repl_c *rc = container_of(ws, struct repl_c, worker);
	struct repl_io *io, *tmp;
	LIST_HEAD(committed);
	LIST_HEAD(ready);
	LIST_HEAD(failed);
	unsigned long flags;
	int r = 0;

	mutex_lock(&rc->commit_lock);
	spin_lock_irqsave(&rc->lock, flags);
	list_splice_init(&rc->deferred, &committed);
	spin_unlock_irqrestore(&rc->lock, flags);

	if (!list_empty(&committed))
		r = repl_md_commit(rc);
	mutex_unlock(&rc->commit_lock);

	spin_lock_irqsave(&rc->lock, flags);
	list_for_each_entry_safe(io, tmp, &committed, work) {
		list_del_init(&io->work);
		if (r) {
			/* P2: never write data whose intent is not durable */
			list_add_tail(&io->work, &failed);
			continue;
		}
		io->needs_commit = false;
		if (!io->parked)
			list_add_tail(&io->work, &ready);
	}
	list_splice_tail_init(&rc->ready, &ready);
	if (r)
		repl_raise_event(rc);
	spin_unlock_irqrestore(&rc->lock, flags);

	list_for_each_entry_safe(io, tmp, &ready, work) {
		list_del_init(&io->work);
		submit_io(io);
	}
	list_for_each_entry_safe(io, tmp, &failed, work) {
		list_del_init(&io->work);
		io->bio->bi_status = BLK_STS_IOERR;
		bio_endio(io->bio);	/* end_io unlinks it from inflight */
	}
}

/*----------------------------------------------------------------
 * Constructor
 *--------------------------------------------------------------*/

/*
 * repl <data dev> <metadata dev> <chunk sectors> [<#feature args> [<feature arg>]*]
 *
 * feature args:
 *   ring_mb <n>          size of the ring's data area in MiB (1..4096, default 32)
 *   sync_timeout_ms <n>  how long a synchronous write waits for the consumer's
 *                        acknowledgement before the target falls behind into
 *                        tracking (100..600000, default 5000)
 *
 * chunk sectors: the bitmap granularity, a power of two from 8 (4 KiB) to
 * 2048 (1 MiB).  The metadata device must have been formatted for this data
 * size and chunk size.
 */
static int parse_features(struct dm_arg_set *as, struct repl_c *rc, char **error)
{
	static const struct dm_arg _args[] = {
		{0, 4, "Invalid number of feature arguments"},
		{1, REPL_MAX_RING_MB, "Invalid ring_mb (1..4096)"},
		{100, 600000, "Invalid sync_timeout_ms (100..600000)"},
	};
	unsigned int argc;
	const char *name;
	int r;

	if (!as->argc)
		return 0;
	r = dm_read_arg_group(_args, as, &argc, error);
	if (r)
		return r;
	while (argc) {
		name = dm_shift_arg(as);
		argc--;
		if (!argc) {
			*error = "Feature argument lacks its value";
			return -EINVAL;
		}
		argc--;
		if (!strcasecmp(name, "ring_mb"))
			r = dm_read_arg(_args + 1, as, &rc->ring_mb, error);
		else if (!strcasecmp(name, "sync_timeout_ms"))
			r = dm_read_arg(_args + 2, as, &rc->sync_timeout_ms, error);
		else {
			*error = "Unknown feature argument";
			r = -EINVAL;
		}
		if (r)
			return r;
	}
	if (as->argc) {
		*error = "Too many arguments";
		return -EINVAL;
	}
	return 0;
}

static int parse_chunk_sectors(const char *arg, struct repl_c *rc, char **error)
{
	unsigned int v;
	char dummy;

	if (sscanf(arg, "%u%c", &v, &dummy) != 1 || v < REPL_MIN_CHUNK_SECTORS ||
	    v > REPL_MAX_CHUNK_SECTORS || !is_power_of_2(v)) {
		*error = "Invalid chunk size (a power of two, 8..2048 sectors)";
		return -EINVAL;
	}
	rc->chunk_sectors = v;
	rc->chunk_shift = __ffs(v);
	return 0;
}

static char *join_args(unsigned int argc, char **argv)
{
	size_t len = 1;
	unsigned int i;
	char *s;

	for (i = 0; i < argc; i++)
		len += strlen(argv[i]) + 1;
	s = kzalloc(len, GFP_KERNEL);
	if (!s)
		return NULL;
	for (i = 0; i < argc; i++) {
		if (i)
			strcat(s, " ");
		strcat(s, argv[i]);
	}
	return s;
}

static void repl_dtr(struct dm_target *ti)
{
	struct repl_c *rc = ti->private;

	if (!rc)
		return;
	mutex_lock(&repl_targets_lock);
	list_del_init(&rc->targets);
	spin_lock_irq(&rc->lock);
	rc->dead = true;
	spin_unlock_irq(&rc->lock);
	mutex_unlock(&repl_targets_lock);
	wake_up_all(&rc->waitq);

	cancel_delayed_work_sync(&rc->timeout_work);
	cancel_work_sync(&rc->event_work);
	if (rc->wq) {
		destroy_workqueue(rc->wq);	/* drains the worker */
		rc->wq = NULL;
	}
	if (rc->copy_wq) {
		destroy_workqueue(rc->copy_wq);	/* idle: no write is in flight */
		rc->copy_wq = NULL;
	}
	/* a consumer's CLEAN checks dead under commit_lock before any I/O */
	mutex_lock(&rc->commit_lock);
	if (rc->data_dev)
		dm_put_device(ti, rc->data_dev);
	if (rc->meta_dev)
		dm_put_device(ti, rc->meta_dev);
	rc->data_dev = rc->meta_dev = NULL;
	mutex_unlock(&rc->commit_lock);
	repl_put(rc);
}

static int repl_ctr(struct dm_target *ti, unsigned int argc, char **argv)
{
	struct dm_arg_set as = { .argc = argc, .argv = argv };
	struct repl_c *rc;
	int r;

	if (argc < 3) {
		ti->error = "Not enough arguments: <data dev> <metadata dev> <chunk sectors>";
		return -EINVAL;
	}

	rc = kzalloc(sizeof(*rc), GFP_KERNEL);
	if (!rc) {
		ti->error = "Cannot allocate repl context";
		return -ENOMEM;
	}
	ti->private = rc;
	rc->ti = ti;
	kref_init(&rc->ref);
	INIT_LIST_HEAD(&rc->targets);
	INIT_LIST_HEAD(&rc->inflight);
	INIT_LIST_HEAD(&rc->sync_waiters);
	INIT_LIST_HEAD(&rc->deferred);
	INIT_LIST_HEAD(&rc->ready);
	spin_lock_init(&rc->lock);
	mutex_init(&rc->commit_lock);
	init_waitqueue_head(&rc->waitq);
	INIT_WORK(&rc->worker, do_worker);
	INIT_WORK(&rc->event_work, event_work);
	INIT_DELAYED_WORK(&rc->timeout_work, timeout_work);
	rc->ring_mb = REPL_DEFAULT_RING_MB;
	rc->sync_timeout_ms = REPL_DEFAULT_SYNC_TIMEOUT_MS;
	rc->mode = REPL_MODE_TRACKING;
	rc->reason = REPL_REASON_NO_CONSUMER;
	rc->next_seq = 1;
	rc->wake_at = U64_MAX;

	rc->table_args = join_args(argc, argv);
	if (!rc->table_args) {
		ti->error = "Cannot allocate table copy";
		r = -ENOMEM;
		goto bad;
	}

	r = dm_get_device(ti, dm_shift_arg(&as), dm_table_get_mode(ti->table), &rc->data_dev);
	if (r) {
		ti->error = "Error opening data device";
		goto bad;
	}
	r = dm_get_device(ti, dm_shift_arg(&as), FMODE_READ | FMODE_WRITE, &rc->meta_dev);
	if (r) {
		ti->error = "Error opening metadata device";
		goto bad;
	}
	if (rc->meta_dev->bdev == rc->data_dev->bdev) {
		ti->error = "Data and metadata devices must differ";
		r = -EINVAL;
		goto bad;
	}
	r = parse_chunk_sectors(dm_shift_arg(&as), rc, &ti->error);
	if (r)
		goto bad;
	r = parse_features(&as, rc, &ti->error);
	if (r)
		goto bad;

	if (ti->len > bdev_nr_sectors(rc->data_dev->bdev)) {
		ti->error = "Data device is smaller than the target";
		r = -EINVAL;
		goto bad;
	}
	rc->sectors = ti->len;
	rc->nr_chunks = DIV_ROUND_UP_ULL(ti->len, rc->chunk_sectors);
	rc->bitmap_blocks = DIV_ROUND_UP_ULL(rc->nr_chunks, REPL_BITS_PER_BLOCK);

	r = repl_md_alloc(rc);
	if (r) {
		ti->error = "Cannot allocate bitmaps";
		goto bad;
	}
	r = repl_md_read_superblock(rc, &ti->error);
	if (r)
		goto bad;
	r = repl_ring_alloc(rc);
	if (r) {
		ti->error = "Cannot allocate the ring";
		goto bad;
	}

	rc->wq = alloc_workqueue("dm-repl", WQ_MEM_RECLAIM | WQ_UNBOUND, 1);
	/* unbound: a copy runs on whichever CPU is free, beside the data write */
	rc->copy_wq = alloc_workqueue("dm-repl-copy", WQ_MEM_RECLAIM | WQ_UNBOUND | WQ_HIGHPRI, 0);
	if (!rc->wq || !rc->copy_wq) {
		ti->error = "Cannot allocate workqueue";
		r = -ENOMEM;
		goto bad;
	}

	ti->num_flush_bios = 1;
	ti->flush_supported = true;
	ti->num_discard_bios = 1;
	ti->num_write_zeroes_bios = 1;
	ti->per_io_data_size = sizeof(struct repl_io);
	ti->accounts_remapped_io = true;

	rc->devt = disk_devt(dm_disk(dm_table_get_md(ti->table)));
	mutex_lock(&repl_targets_lock);
	list_add_tail(&rc->targets, &repl_targets);
	mutex_unlock(&repl_targets_lock);
	return 0;
bad:
	repl_dtr(ti);
	ti->private = NULL;
	return r;
}

/*----------------------------------------------------------------
 * Suspend and resume
 *--------------------------------------------------------------*/
static void repl_postsuspend(struct dm_target *ti)
{
	struct repl_c *rc = ti->private;

	/* all I/O is done: commit what the worker may not have */
	flush_workqueue(rc->wq);
	mutex_lock(&rc->commit_lock);
	if (!repl_md_commit(rc) && repl_md_write_superblock(rc, true))
		DMERR("%u:%u: cannot mark the metadata clean", MAJOR(rc->devt), MINOR(rc->devt));
	/* until our own preresume, the metadata is the next table's */
	rc->suspended = true;
	mutex_unlock(&rc->commit_lock);
	rc->resumed = false;
}

static int repl_preresume(struct dm_target *ti)
{
	struct repl_c *rc = ti->private;
	unsigned long flags;
	int r;

	char *error = NULL;

	mutex_lock(&rc->commit_lock);
	rc->suspended = false;
	/* the previous table (if any) committed its bitmap at postsuspend */
	r = repl_md_read_superblock(rc, &error);
	if (!r)
		r = repl_md_load_bitmap(rc);
	if (!r) {
		rc->unclean_start = !(le32_to_cpu(rc->sb.flags) & REPL_SB_CLEAN);
		r = repl_md_write_superblock(rc, false);
	}
	mutex_unlock(&rc->commit_lock);
	if (r) {
		DMERR("%u:%u: cannot read or update metadata (%d)",
		      MAJOR(rc->devt), MINOR(rc->devt), r);
		spin_lock_irqsave(&rc->lock, flags);
		rc->meta_mode = REPL_META_FAIL;
		repl_raise_event(rc);
		spin_unlock_irqrestore(&rc->lock, flags);
	}
	rc->resumed = true;
	return 0;
}

/*----------------------------------------------------------------
 * Status and messages
 *--------------------------------------------------------------*/

/*
 * INFO:
 *   <meta mode> <mode> <reason> <chunk sectors> <dirty>/<chunks>
 *   <writes> <write bytes> <reads> <read bytes> <ring used>/<ring bytes>
 *   <published> <acked> <consumer> <sync> <start>
 */
static void repl_status(struct dm_target *ti, status_type_t type,
			unsigned int status_flags, char *result, unsigned int maxlen)
{
	struct repl_c *rc = ti->private;
	unsigned int sz = 0;
	unsigned long flags;

	switch (type) {
	case STATUSTYPE_INFO:
		spin_lock_irqsave(&rc->lock, flags);
		DMEMIT("%s %s %s %llu %llu/%llu %llu %llu %llu %llu %llu/%llu %llu %llu %s %s %s",
		       rc->meta_mode == REPL_META_FAIL ? "fail" : "rw",
		       mode_names[rc->mode], reason_name(rc->reason),
		       (unsigned long long)rc->chunk_sectors,
		       rc->nr_dirty, rc->nr_chunks,
		       rc->writes, rc->write_bytes,
		       (u64)atomic64_read(&rc->reads), (u64)atomic64_read(&rc->read_bytes),
		       repl_ring_used(rc), rc->data_bytes, rc->published, rc->acked,
		       rc->consumer ? "attached" : "detached",
		       (rc->flags & REPL_F_SYNC) ? "sync" : "async",
		       rc->unclean_start ? "unclean" : "clean");
		spin_unlock_irqrestore(&rc->lock, flags);
		break;
	case STATUSTYPE_TABLE:
		DMEMIT("%s", rc->table_args);
		break;
	case STATUSTYPE_IMA:
		*result = '\0';
		break;
	}
}

/*
 * Messages:
 *   mark_dirty <first chunk> <count>   mark chunks out of sync (durably)
 *   fall_behind                        drop to tracking mode now
 */
static int repl_message(struct dm_target *ti, unsigned int argc, char **argv,
			char *result, unsigned int maxlen)
{
	struct repl_c *rc = ti->private;
	unsigned long flags;
	u64 first, count, c, next;
	char dummy;
	int r;

	if (argc == 1 && !strcasecmp(argv[0], "fall_behind")) {
		LIST_HEAD(release);

		spin_lock_irqsave(&rc->lock, flags);
		fall_behind(rc, REPL_REASON_MESSAGE, &release);
		spin_unlock_irqrestore(&rc->lock, flags);
		repl_complete_list(&release);
		return 0;
	}
	if (argc == 3 && !strcasecmp(argv[0], "mark_dirty")) {
		if (sscanf(argv[1], "%llu%c", &first, &dummy) != 1 ||
		    sscanf(argv[2], "%llu%c", &count, &dummy) != 1 ||
		    !count || first >= rc->nr_chunks || count > rc->nr_chunks - first) {
			DMWARN("mark_dirty: invalid chunk range");
			return -EINVAL;
		}
		mutex_lock(&rc->commit_lock);
		if (rc->suspended) {
			mutex_unlock(&rc->commit_lock);
			DMWARN("mark_dirty: device suspended");
			return -EAGAIN;
		}
		/*
		 * A metadata block at a time, letting go of the lock and the CPU in
		 * between: the range may be the whole device.  Holding commit_lock
		 * keeps CLEAN and commits out until every bit is set.
		 */
		for (c = first; c < first + count; c = next) {
			next = min(first + count, round_down(c, REPL_BITS_PER_BLOCK) + REPL_BITS_PER_BLOCK);
			spin_lock_irqsave(&rc->lock, flags);
			set_dirty(rc, c, next);
			spin_unlock_irqrestore(&rc->lock, flags);
			cond_resched();
		}
		r = repl_md_commit(rc);
		mutex_unlock(&rc->commit_lock);
		return r;
	}
	DMWARN("unrecognised message received: %s%s", argv[0], argc > 1 ? " ..." : "");
	return -EINVAL;
}

static int repl_iterate_devices(struct dm_target *ti, iterate_devices_callout_fn fn, void *data)
{
	struct repl_c *rc = ti->private;

	return fn(ti, rc->data_dev, 0, ti->len, data);
}

static struct target_type repl_target = {
	.name = REPL_TARGET_NAME,
	.version = {1, 0, 0},
	.module = THIS_MODULE,
	.features = DM_TARGET_SINGLETON,
	.ctr = repl_ctr,
	.dtr = repl_dtr,
	.map = repl_map,
	.end_io = repl_end_io,
	.postsuspend = repl_postsuspend,
	.preresume = repl_preresume,
	.status = repl_status,
	.message = repl_message,
	.iterate_devices = repl_iterate_devices,
};

static int __init dm_repl_init(void)
{
	int r;

	r = repl_misc_register();
	if (r)
		return r;
	r = dm_register_target(&repl_target);
	if (r)
		repl_misc_deregister();
	return r;
}

static void __exit dm_repl_exit(void)
{
	dm_unregister_target(&repl_target);
	repl_misc_deregister();
}

module_init(dm_repl_init);
module_exit(dm_repl_exit);

MODULE_DESCRIPTION(DM_NAME " block replication target (ordered write ring, dirty bitmap)");
MODULE_LICENSE("GPL");
