// SPDX-License-Identifier: GPL-2.0
/*
 * dm-repl ring: the records of completed writes, and /dev/dm-repl, the
 * character device through which one consumer per target reads them
 * (mmap, read-only), waits for them (poll or REPL_IOC_WAIT), acknowledges
 * them, and reads and cleans the dirty bitmap.
 *
 * The ring is one vmalloc_user() area: desc_count fixed-size records
 * (struct repl_rec, slot seq % desc_count), then a byte ring of data.
 * Data is allocated in seq order, contiguous and 512-byte aligned; when a
 * record does not fit before the end, the rest of the area is skipped.
 * Space is reclaimed when the consumer acknowledges.
 */
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/poll.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>
#include <linux/version.h>
#include <linux/bitmap.h>
#include <linux/sched/signal.h>

#include "dm-repl.h"

#define REPL_MAX_BITMAP_CHUNKS (1ULL << 26)	/* per GET_BITMAP call */

int repl_ring_alloc(struct repl_c *rc)
{
	rc->data_bytes = (u64)rc->ring_mb << 20;
	rc->desc_count = max_t(u64, 1024, rc->data_bytes >> 12);
	rc->desc_bytes = PAGE_ALIGN(rc->desc_count * sizeof(struct repl_rec));
	rc->ring = vmalloc_user(rc->desc_bytes + rc->data_bytes);
	if (!rc->ring)
		return -ENOMEM;
	rc->descs = rc->ring;
	rc->data = (u8 *)rc->ring + rc->desc_bytes;
	return 0;
}

void repl_ring_free(struct repl_c *rc)
{
	vfree(rc->ring);
	rc->ring = NULL;
}

static bool ring_empty(struct repl_c *rc)
{
	return rc->acked + 1 >= rc->ring_end;
}

/* rc->lock held: start a new, empty ring at the next seq. */
void repl_ring_reset(struct repl_c *rc)
{
	rc->data_head = rc->data_tail = 0;
	rc->stream_start = rc->ring_end = rc->next_seq;
	rc->acked = rc->released = rc->next_seq - 1;
}

u64 repl_ring_used(struct repl_c *rc)
{
	if (ring_empty(rc))
		return 0;
	if (rc->data_head >= rc->data_tail)
		return rc->data_head - rc->data_tail;
	return rc->data_bytes - rc->data_tail + rc->data_head;
}

/* rc->lock held: allocate len bytes of data for record seq. */
int repl_ring_reserve(struct repl_c *rc, u64 seq, u32 len, u64 *off)
{
	u64 head, tail, size = rc->data_bytes;

	if (ring_empty(rc))
		rc->data_head = rc->data_tail = 0;
	head = rc->data_head;
	tail = rc->data_tail;
	len = round_up(len, SECTOR_SIZE);

	if (!len)
		*off = head;
	else if (len > size)
		return -ENOSPC;
	else if (head >= tail) {
		if (size - head >= len)
			*off = head;
		else if (tail > len)
			*off = 0;
		else
			return -ENOSPC;
	} else if (tail - head > len) {
		*off = head;
	} else {
		return -ENOSPC;
	}
	rc->data_head = *off + len;
	rc->descs[seq % rc->desc_count].data_off = *off;
	rc->ring_end = seq + 1;
	return 0;
}

/* rc->lock held: wake waiters before their batch (sync writers wait; ring filling)? */
static bool wake_early(struct repl_c *rc)
{
	return (rc->flags & REPL_F_SYNC) || repl_ring_used(rc) >= rc->data_bytes / 4;
}

/*
 * rc->lock held, published just moved: wake the waiters?  Each waiter
 * registers the published value it waits for in wake_at (reached); a wake
 * resets it and the waiters that must sleep on register again.
 */
bool repl_should_wake(struct repl_c *rc)
{
	if (rc->published < rc->wake_at && !wake_early(rc))
		return false;
	rc->wake_at = U64_MAX;
	return true;
}

/*
 * The condition of a wait for published >= target, which an early wake-up
 * ends once published >= first: registers the waiter.
 */
static bool reached(struct repl_c *rc, u64 first, u64 target)
{
	bool r;

	spin_lock_irq(&rc->lock);
	r = rc->published >= target || rc->dead ||
	    (rc->published >= first && wake_early(rc));
	if (!r)
		rc->wake_at = min(rc->wake_at, target);
	spin_unlock_irq(&rc->lock);
	return r;
}

/* rc->lock held: reclaim the space of acknowledged records. */
void repl_ring_consumed(struct repl_c *rc)
{
	if (ring_empty(rc))
		rc->data_head = rc->data_tail = 0;
	else
		rc->data_tail = rc->descs[(rc->acked + 1) % rc->desc_count].data_off;
}

/*----------------------------------------------------------------
 * The consumer's file
 *--------------------------------------------------------------*/
struct repl_file {
	struct mutex lock;		/* serialises ATTACH and mmap */
	struct repl_c *rc;
	u64 seen_published;
	u64 seen_events;
};

static int repl_open(struct inode *inode, struct file *file)
{
	struct repl_file *rf = kzalloc(sizeof(*rf), GFP_KERNEL);

	if (!rf)
		return -ENOMEM;
	mutex_init(&rf->lock);
	file->private_data = rf;
	return nonseekable_open(inode, file);
}

static void detach(struct repl_c *rc)
{
	LIST_HEAD(release);

	spin_lock_irq(&rc->lock);
	rc->consumer = false;
	rc->flags = 0;
	repl_set_mode(rc, REPL_MODE_TRACKING, REPL_REASON_DETACHED);
	repl_release_sync_waiters(rc, U64_MAX, &release);
	spin_unlock_irq(&rc->lock);
	repl_complete_list(&release);
}

static int repl_release(struct inode *inode, struct file *file)
{
	struct repl_file *rf = file->private_data;

	if (rf->rc) {
		detach(rf->rc);
		repl_put(rf->rc);
	}
	kfree(rf);
	return 0;
}

static long do_attach(struct repl_file *rf, void __user *arg)
{
	struct repl_attach a;
	struct repl_c *rc;

	if (copy_from_user(&a, arg, sizeof(a)))
		return -EFAULT;
	if (a.flags & ~REPL_F_SYNC || a.pad)
		return -EINVAL;
	if (rf->rc)
		return -EISCONN;

	mutex_lock(&repl_targets_lock);
	rc = repl_find_target(MKDEV(a.major, a.minor));
	if (!rc) {
		mutex_unlock(&repl_targets_lock);
		return -ENODEV;
	}
	spin_lock_irq(&rc->lock);
	if (rc->consumer) {
		spin_unlock_irq(&rc->lock);
		mutex_unlock(&repl_targets_lock);
		return -EBUSY;
	}
	rc->consumer = true;
	rc->flags = a.flags;
	spin_unlock_irq(&rc->lock);
	repl_get(rc);
	/* published once: other ioctls read rf->rc without rf->lock */
	smp_store_release(&rf->rc, rc);
	mutex_unlock(&repl_targets_lock);

	a.desc_count = rc->desc_count;
	a.desc_bytes = rc->desc_bytes;
	a.data_bytes = rc->data_bytes;
	a.data_sectors = rc->sectors;
	a.nr_chunks = rc->nr_chunks;
	a.chunk_sectors = rc->chunk_sectors;
	a.sync_timeout_ms = rc->sync_timeout_ms;
	return copy_to_user(arg, &a, sizeof(a)) ? -EFAULT : 0;
}

static void fill_state(struct repl_c *rc, struct repl_state *s)
{
	memset(s, 0, sizeof(*s));
	spin_lock_irq(&rc->lock);
	s->mode = rc->mode;
	s->reason = rc->reason;
	s->meta_mode = rc->meta_mode;
	s->flags = rc->flags;
	s->stream_start = rc->stream_start;
	s->ring_end = rc->ring_end;
	s->published = rc->published;
	s->acked = rc->acked;
	s->next_seq = rc->next_seq;
	s->events = rc->events;
	s->dirty_chunks = rc->nr_dirty;
	s->ring_used = repl_ring_used(rc);
	s->ring_bytes = rc->data_bytes;
	s->writes = rc->writes;
	s->write_bytes = rc->write_bytes;
	s->mark = rc->mark;
	spin_unlock_irq(&rc->lock);
	s->reads = atomic64_read(&rc->reads);
	s->read_bytes = atomic64_read(&rc->read_bytes);
}

/* Wait until every write with seq < mark has completed. */
static long wait_published(struct repl_c *rc, u64 mark)
{
	long r = wait_event_interruptible(rc->waitq, reached(rc, mark - 1, mark - 1));
	if (r)
		return r;
	return READ_ONCE(rc->dead) ? -ENODEV : 0;
}

static long do_mark(struct repl_c *rc, void __user *arg, bool start_stream)
{
	struct repl_mark m;
	LIST_HEAD(release);
	long r;

	if (start_stream) {
		u64 before;

		/*
		 * Writes of the old stream may still be copying into ring space
		 * that the reset hands out again: stop reserving (tracking), and
		 * let every write entered so far complete before the reset.
		 */
		spin_lock_irq(&rc->lock);
		if (rc->mode == REPL_MODE_STREAMING)
			repl_set_mode(rc, REPL_MODE_TRACKING, REPL_REASON_STARTED);
		before = rc->next_seq;
		spin_unlock_irq(&rc->lock);
		r = wait_published(rc, before);
		if (r)
			return r;
	}
	spin_lock_irq(&rc->lock);
	if (start_stream) {
		repl_release_sync_waiters(rc, U64_MAX, &release);
		repl_ring_reset(rc);
		repl_set_mode(rc, REPL_MODE_STREAMING, REPL_REASON_STARTED);
	}
	bitmap_zero(rc->recent, rc->nr_chunks);
	m.seq = rc->mark = rc->next_seq;
	spin_unlock_irq(&rc->lock);
	repl_complete_list(&release);

	r = wait_published(rc, m.seq);
	if (r)
		return r;
	return copy_to_user(arg, &m, sizeof(m)) ? -EFAULT : 0;
}

static long do_ack(struct repl_c *rc, void __user *arg)
{
	struct repl_ack a;
	LIST_HEAD(release);

	if (copy_from_user(&a, arg, sizeof(a)))
		return -EFAULT;
	spin_lock_irq(&rc->lock);
	if (a.seq < rc->acked || a.seq > rc->published || a.seq >= rc->ring_end) {
		spin_unlock_irq(&rc->lock);
		return a.seq == rc->acked ? 0 : -ERANGE;
	}
	rc->acked = a.seq;
	repl_release_sync_waiters(rc, a.seq, &release);
	repl_ring_consumed(rc);
	spin_unlock_irq(&rc->lock);
	repl_complete_list(&release);
	return 0;
}

static long do_release(struct repl_c *rc, void __user *arg)
{
	struct repl_ack a;
	LIST_HEAD(release);

	if (copy_from_user(&a, arg, sizeof(a)))
		return -EFAULT;
	spin_lock_irq(&rc->lock);
	if (a.seq > rc->published || a.seq >= rc->ring_end) {
		spin_unlock_irq(&rc->lock);
		return -ERANGE;
	}
	if (a.seq > rc->released) {
		rc->released = a.seq;
		repl_release_sync_waiters(rc, a.seq, &release);
	}
	spin_unlock_irq(&rc->lock);
	repl_complete_list(&release);
	return 0;
}

static long check_range(struct repl_c *rc, u64 first, u64 count)
{
	if (!count || first >= rc->nr_chunks || count > rc->nr_chunks - first)
		return -EINVAL;
	return 0;
}

static long do_clean(struct repl_c *rc, void __user *arg)
{
	struct repl_clean c;
	u64 i, end;
	long r;

	if (copy_from_user(&c, arg, sizeof(c)))
		return -EFAULT;
	r = check_range(rc, c.first, c.count);
	if (r)
		return r;
	c.cleared = 0;
	end = c.first + c.count;
	r = 0;

	mutex_lock(&rc->commit_lock);
	if (rc->dead || rc->suspended) {
		/* removed, or suspended for a reload: the metadata is not ours */
		mutex_unlock(&rc->commit_lock);
		return rc->dead ? -ENODEV : -EAGAIN;
	}
	spin_lock_irq(&rc->lock);
	for (i = c.first; i < end; i++) {
		if (c.mark != rc->mark || !c.mark) {
			/* a MARK came (now or while the lock was dropped) */
			r = -ESTALE;
			break;
		}
		if (test_bit(i, rc->dirty) && !test_bit(i, rc->recent)) {
			__clear_bit(i, rc->dirty);
			__set_bit(i / REPL_BITS_PER_BLOCK, rc->blocks_dirty);
			rc->nr_dirty--;
			c.cleared++;
		}
		if (!((i + 1) % 65536)) {
			/* do not keep interrupts off for a whole large device */
			spin_unlock_irq(&rc->lock);
			cond_resched();
			spin_lock_irq(&rc->lock);
		}
	}
	spin_unlock_irq(&rc->lock);
	if (c.cleared || r) {
		long w = repl_md_commit(rc);

		r = r ?: w;
	}
	mutex_unlock(&rc->commit_lock);
	if (r)
		return r;
	return copy_to_user(arg, &c, sizeof(c)) ? -EFAULT : 0;
}

static long do_get_bitmap(struct repl_c *rc, void __user *arg)
{
	struct repl_bitmap b;
	u64 *buf;
	size_t words, w;
	long r;

	if (copy_from_user(&b, arg, sizeof(b)))
		return -EFAULT;
	r = check_range(rc, b.first, b.count);
	if (r || b.first % 64 || b.count > REPL_MAX_BITMAP_CHUNKS)
		return -EINVAL;
	words = DIV_ROUND_UP(b.count, 64);
	buf = kvcalloc(words, sizeof(u64), GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	spin_lock_irq(&rc->lock);
	bitmap_to_arr64(buf, rc->dirty + b.first / BITS_PER_LONG, b.count);
	spin_unlock_irq(&rc->lock);
	b.dirty = 0;
	for (w = 0; w < words; w++) {
		b.dirty += hweight64(buf[w]);
		buf[w] = (__force u64)cpu_to_le64(buf[w]);
	}
	r = 0;
	if (copy_to_user(u64_to_user_ptr(b.addr), buf, DIV_ROUND_UP(b.count, 8)) ||
	    copy_to_user(arg, &b, sizeof(b)))
		r = -EFAULT;
	kvfree(buf);
	return r;
}

static long do_set_flags(struct repl_c *rc, void __user *arg)
{
	struct repl_flags f;
	LIST_HEAD(release);

	if (copy_from_user(&f, arg, sizeof(f)))
		return -EFAULT;
	if (f.flags & ~REPL_F_SYNC || f.pad)
		return -EINVAL;
	spin_lock_irq(&rc->lock);
	rc->flags = f.flags;
	if (!(f.flags & REPL_F_SYNC))
		repl_release_sync_waiters(rc, U64_MAX, &release);
	spin_unlock_irq(&rc->lock);
	repl_complete_list(&release);
	return 0;
}

static long do_wait(struct repl_file *rf, struct repl_c *rc, void __user *arg)
{
	struct repl_wait w;
	long r;

	if (copy_from_user(&w, arg, sizeof(w)))
		return -EFAULT;
	if (w.after > U64_MAX - max(w.batch, 1U))
		return -EINVAL;
	r = wait_event_interruptible_timeout(rc->waitq,
		READ_ONCE(rc->events) != rf->seen_events ||
		reached(rc, w.after + 1, w.after + max(w.batch, 1U)),
		msecs_to_jiffies(w.timeout_ms));
	return r < 0 ? r : 0;
}

static long repl_ioctl(struct file *file, unsigned int cmd, unsigned long uarg)
{
	struct repl_file *rf = file->private_data;
	void __user *arg = (void __user *)uarg;
	struct repl_state s;
	struct repl_c *rc;
	long r;

	if (cmd == REPL_IOC_ATTACH) {
		mutex_lock(&rf->lock);
		r = do_attach(rf, arg);
		mutex_unlock(&rf->lock);
		return r;
	}
	/*
	 * Once attached, rf->rc never changes until release, and the file holds
	 * a reference: the other ioctls run without rf->lock, so that one
	 * thread waiting (WAIT, MARK) does not hold up another's ACK.
	 */
	rc = smp_load_acquire(&rf->rc);
	if (!rc)
		return -ENOTCONN;
	if (READ_ONCE(rc->dead))
		return -ENODEV;

	switch (cmd) {
	case REPL_IOC_GET_STATE:
		fill_state(rc, &s);
		rf->seen_published = s.published;
		rf->seen_events = s.events;
		r = copy_to_user(arg, &s, sizeof(s)) ? -EFAULT : 0;
		break;
	case REPL_IOC_WAIT:
		r = do_wait(rf, rc, arg);
		break;
	case REPL_IOC_ACK:
		r = do_ack(rc, arg);
		break;
	case REPL_IOC_START_STREAM:
		r = do_mark(rc, arg, true);
		break;
	case REPL_IOC_MARK:
		r = do_mark(rc, arg, false);
		break;
	case REPL_IOC_RELEASE:
		r = do_release(rc, arg);
		break;
	case REPL_IOC_CLEAN:
		r = do_clean(rc, arg);
		break;
	case REPL_IOC_GET_BITMAP:
		r = do_get_bitmap(rc, arg);
		break;
	case REPL_IOC_SET_FLAGS:
		r = do_set_flags(rc, arg);
		break;
	default:
		r = -ENOTTY;
	}
	return r;
}

static __poll_t repl_poll(struct file *file, poll_table *wait)
{
	struct repl_file *rf = file->private_data;
	struct repl_c *rc = smp_load_acquire(&rf->rc);
	__poll_t mask = 0;

	if (!rc)
		return EPOLLERR;
	poll_wait(file, &rc->waitq, wait);
	if (READ_ONCE(rc->dead))
		return EPOLLHUP | EPOLLERR;
	if (reached(rc, rf->seen_published + 1, rf->seen_published + 1))
		mask |= EPOLLIN | EPOLLRDNORM;
	if (READ_ONCE(rc->events) != rf->seen_events)
		mask |= EPOLLPRI;
	return mask;
}

static int repl_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct repl_file *rf = file->private_data;
	struct repl_c *rc;
	int r;

	mutex_lock(&rf->lock);
	rc = rf->rc;
	r = -ENOTCONN;
	if (!rc)
		goto out;
	r = -EPERM;
	if (vma->vm_flags & VM_WRITE)
		goto out;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_clear(vma, VM_MAYWRITE);	/* vm_flags is read-only since 6.3 */
#else
	vma->vm_flags &= ~VM_MAYWRITE;
#endif
	/* the file (and so rc) stays referenced as long as the mapping */
	r = remap_vmalloc_range(vma, rc->ring, vma->vm_pgoff);
out:
	mutex_unlock(&rf->lock);
	return r;
}

static const struct file_operations repl_fops = {
	.owner = THIS_MODULE,
	.open = repl_open,
	.release = repl_release,
	.unlocked_ioctl = repl_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.poll = repl_poll,
	.mmap = repl_mmap,
	/* no .llseek: lseek fails with ESPIPE (no_llseek is gone in 6.12) */
};

static struct miscdevice repl_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = REPL_MISC_NAME,
	.fops = &repl_fops,
	.mode = 0600,
};

int repl_misc_register(void)
{
	return misc_register(&repl_misc);
}

void repl_misc_deregister(void)
{
	misc_deregister(&repl_misc);
}
