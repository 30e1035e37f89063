/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * dm-repl user-space API.
 *
 * The one header shared by the kernel target (kmod/) and the control plane
 * (pyctl/repctl/uapi.py, which builds its cffi cdef and its constants from
 * this file).  Rules:
 *
 *  - fixed-width types only, explicit padding, every struct a multiple of 8
 *    bytes; on-disk fields are little-endian;
 *  - one #define per line, whose value is a literal integer, a string, or an
 *    _IO/_IOR/_IOW/_IOWR of a literal and a struct of this file;
 *  - numbers are appended, never changed; a changed struct gets a new ioctl.
 */
#ifndef _DM_REPL_UAPI_H
#define _DM_REPL_UAPI_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define REPL_TARGET_NAME "repl"
#define REPL_MISC_NAME "dm-repl"

/* ------------------------------------------------------------------ */
/* Metadata device layout                                              */
/* ------------------------------------------------------------------ */

#define REPL_SB_MAGIC 0x4c504552
#define REPL_META_VERSION 1
#define REPL_META_BLOCK_SIZE 4096
#define REPL_BITMAP_START_BLOCK 1
#define REPL_MIN_CHUNK_SECTORS 8
#define REPL_MAX_CHUNK_SECTORS 2048

/* superblock flags */
#define REPL_SB_CLEAN 1

/*
 * Block 0 of the metadata device.  csum is zlib's crc32 of bytes 4..4095
 * of the block.  An all-zero block is "not formatted".  The bitmap follows
 * in blocks REPL_BITMAP_START_BLOCK.. : bit n (byte n/8, bit n%8) set means
 * chunk n may differ from some target.
 */
struct repl_superblock {
	__le32 csum;
	__le32 magic;
	__le32 version;
	__le32 flags;
	__u8 uuid[16];
	__le64 data_sectors;
	__le64 nr_chunks;
	__le32 chunk_sectors;
	__le32 bitmap_blocks;
	__le64 format_time;
	__le64 mount_count;
};

/* ------------------------------------------------------------------ */
/* The ordered ring                                                    */
/* ------------------------------------------------------------------ */

/* repl_rec.op */
#define REPL_OP_WRITE 1
#define REPL_OP_FLUSH 2
#define REPL_OP_DISCARD 3
#define REPL_OP_WRITE_ZEROES 4
/* a discard or write-zeroes that the data device refused as unsupported:
 * it changed nothing there, so a target must not apply it either */
#define REPL_OP_NOOP 5

/* repl_rec.flags */
#define REPL_REC_FUA 1

/*
 * One record per write, flush, discard or write-zeroes, in the order of the
 * ring (seq).  mmap() of the control file gives desc_count records at offset
 * 0 (record seq lives at index seq % desc_count), then the data area at
 * offset desc_bytes; a WRITE's data is data_len contiguous bytes at data_off
 * of the data area, 512-byte aligned.
 */
struct repl_rec {
	__u64 seq;
	__u64 sector;
	__u32 len;
	__u16 op;
	__u16 flags;
	__u64 data_off;
	__u32 data_len;
	__u32 pad;
	__u64 reserved[3];
};

/* modes (repl_state.mode) */
#define REPL_MODE_TRACKING 0
#define REPL_MODE_STREAMING 1

/* why the last mode change happened (repl_state.reason) */
#define REPL_REASON_NONE 0
#define REPL_REASON_NO_CONSUMER 1
#define REPL_REASON_ATTACHED 2
#define REPL_REASON_RING_FULL 3
#define REPL_REASON_SYNC_TIMEOUT 4
#define REPL_REASON_DETACHED 5
#define REPL_REASON_MESSAGE 6
#define REPL_REASON_STARTED 7
#define REPL_REASON_IO_ERROR 8

/* metadata modes (repl_state.meta_mode) */
#define REPL_META_RW 0
#define REPL_META_FAIL 1

/* repl_attach.flags and repl_flags.flags */
#define REPL_F_SYNC 1

/* ------------------------------------------------------------------ */
/* ioctls on /dev/dm-repl                                              */
/* ------------------------------------------------------------------ */

/* Bind this open file to the repl device major:minor, as its consumer. */
struct repl_attach {
	__u32 major;
	__u32 minor;
	__u32 flags;
	__u32 pad;
	/* out */
	__u64 desc_count;
	__u64 desc_bytes;
	__u64 data_bytes;
	__u64 data_sectors;
	__u64 nr_chunks;
	__u32 chunk_sectors;
	__u32 sync_timeout_ms;
};

/*
 * Records with seq in (acked, published] and [stream_start, ring_end) are
 * readable in the ring.  While streaming, ring_end == next_seq.
 */
struct repl_state {
	__u32 mode;
	__u32 reason;
	__u32 meta_mode;
	__u32 flags;
	__u64 stream_start;
	__u64 ring_end;
	__u64 published;
	__u64 acked;
	__u64 next_seq;
	__u64 events;
	__u64 dirty_chunks;
	__u64 ring_used;
	__u64 ring_bytes;
	__u64 writes;
	__u64 write_bytes;
	__u64 reads;
	__u64 read_bytes;
	__u64 mark;
};

/*
 * Wait until published >= after + batch (a batch of 0 counts as 1), the mode
 * changes, or timeout_ms passes.  A batch lets an asynchronous consumer be
 * woken once per batch of records rather than once per write; the target
 * wakes it earlier when a quarter of the ring's data area is in use, and for
 * every record while REPL_F_SYNC is set (synchronous writers wait).
 */
struct repl_wait {
	__u64 after;
	__u32 timeout_ms;
	__u32 batch;
};

/* Records with seq <= seq are consumed: their ring space is reused and
 * synchronous writers up to seq complete. */
struct repl_ack {
	__u64 seq;
};

/* START_STREAM and MARK return a mark: every write with seq < mark is on the
 * data device when the ioctl returns; writes from seq >= mark on are
 * remembered for CLEAN. */
struct repl_mark {
	__u64 seq;
};

/* Clear the dirty bits of chunks [first, first + count) that no write has
 * touched since mark (which must be the latest mark). */
struct repl_clean {
	__u64 mark;
	__u64 first;
	__u64 count;
	__u64 cleared;
};

/* Copy the dirty bitmap of chunks [first, first + count) to addr; first is a
 * multiple of 64; bit n of byte k is chunk first + 8k + n. */
struct repl_bitmap {
	__u64 first;
	__u64 count;
	__u64 addr;
	__u64 dirty;
};

struct repl_flags {
	__u32 flags;
	__u32 pad;
};

#define REPL_IOC_MAGIC 0xDB

#define REPL_IOC_ATTACH _IOWR(0xDB, 1, struct repl_attach)
#define REPL_IOC_GET_STATE _IOR(0xDB, 2, struct repl_state)
#define REPL_IOC_WAIT _IOW(0xDB, 3, struct repl_wait)
#define REPL_IOC_ACK _IOW(0xDB, 4, struct repl_ack)
#define REPL_IOC_START_STREAM _IOR(0xDB, 5, struct repl_mark)
#define REPL_IOC_MARK _IOR(0xDB, 6, struct repl_mark)
#define REPL_IOC_CLEAN _IOWR(0xDB, 7, struct repl_clean)
#define REPL_IOC_GET_BITMAP _IOWR(0xDB, 8, struct repl_bitmap)
#define REPL_IOC_SET_FLAGS _IOW(0xDB, 9, struct repl_flags)
/* Complete synchronous writers up to seq without giving back ring space
 * (the synchronous targets have them; slower asynchronous ones still read). */
#define REPL_IOC_RELEASE _IOW(0xDB, 10, struct repl_ack)

#endif /* _DM_REPL_UAPI_H */
