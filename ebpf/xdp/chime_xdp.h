/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * Definitions shared by chime's XDP program and its userspace loader
 * (mirrored in ebpf/src/program.rs; keep the two in step).
 */
#ifndef CHIME_XDP_H
#define CHIME_XDP_H

#include <linux/types.h>

/*
 * Prepended to each steered packet (bpf_xdp_adjust_head): AF_XDP userspace
 * finds it at the start of the frame, the Ethernet header right after it.
 */
struct chime_xdp_meta {
	__u64 rx_ns;   /* receive time, see flags */
	__u32 flags;   /* CHIME_META_* */
	__u32 magic;   /* CHIME_META_MAGIC: metadata present and of this layout */
};

#define CHIME_META_MAGIC 0xC41E0001u
/* rx_ns is the NIC (PHC) hardware stamp. Without it (flags 0) rx_ns is
 * bpf_ktime_get_tai_ns(); userspace subtracts the kernel's TAI offset. */
#define CHIME_META_HW 1u

/* The one entry of the `config` map; all fields network-facing in byte order
 * stated by their names. */
struct chime_xdp_config {
	__u16 port_be;         /* UDP destination port, network byte order (0: 123) */
	__u8 drop_non_client;  /* drop NTP packets whose mode is not 3 (client) */
	__u8 pad;
	__u32 pad2;
	/* Per-source limit (see src_limit in chime_xdp.c): nanoseconds one
	 * request costs (1e9 / rate; 0: no limit) and how far ahead of now a
	 * source's schedule may run ((burst - 1) * interval). */
	__u64 source_interval_ns;
	__u64 source_tolerance_ns;
};

/* Key of the src_limit map: the source address, IPv4 as ::ffff:a.b.c.d. */
struct chime_src_key {
	__u8 addr[16];
};

/* Keys of the deny LPM tries. */
struct chime_lpm_v4 {
	__u32 prefixlen;
	__u32 addr;            /* network byte order */
};

struct chime_lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Key of the server_v6 hash. */
struct chime_in6 {
	__u8 addr[16];
};

/*
 * Indexes of the per-CPU `stats` array. Every packet is counted under exactly
 * one verdict (CHIME_STAT_PASS_* .. CHIME_STAT_REDIRECT, and
 * CHIME_STAT_DROP_FLOOD, appended later); the stamp counters count the
 * metadata written for steered packets. Append only: the numbers are part of
 * the userspace ABI (XdpCounter in program.rs).
 */
enum chime_stat {
	CHIME_STAT_PASS_NOT_IP = 0,    /* not IPv4/IPv6 (ARP, LLDP, QinQ, ...) */
	CHIME_STAT_PASS_NOT_UDP,       /* IP but not UDP (TCP, ICMP, ...) */
	CHIME_STAT_PASS_FRAGMENT,      /* IPv4 fragment */
	CHIME_STAT_PASS_IPV6_EXT,      /* IPv6 with an extension header */
	CHIME_STAT_PASS_OTHER_PORT,    /* UDP to another port */
	CHIME_STAT_PASS_OTHER_DEST,    /* NTP port but not a server address */
	CHIME_STAT_PASS_MALFORMED,     /* truncated or invalid headers */
	CHIME_STAT_PASS_NO_SOCKET,     /* steered, but no AF_XDP socket on the queue */
	CHIME_STAT_DROP_SHORT,         /* UDP payload shorter than 48 bytes */
	CHIME_STAT_DROP_NOT_CLIENT,    /* NTP mode other than 3 */
	CHIME_STAT_DROP_DENIED,        /* source in deny_v4/deny_v6 */
	CHIME_STAT_REDIRECT,           /* redirected to the queue's AF_XDP socket */
	CHIME_STAT_META_FAILED,        /* bpf_xdp_adjust_meta failed: no stamp */
	CHIME_STAT_STAMP_HW,           /* metadata with the NIC's stamp */
	CHIME_STAT_STAMP_SW,           /* metadata with bpf_ktime_get_tai_ns() */
	CHIME_STAT_DROP_FLOOD,         /* verdict: source over its per-source rate */
	CHIME_STAT_COUNT,
};

#define CHIME_NTP_MIN_LEN 48
#define CHIME_NTP_MODE_CLIENT 3
#define CHIME_XSKS_MAX 256
/* Default capacity of src_limit; the loader sets the configured one. */
#define CHIME_SRC_LIMIT_ENTRIES 65536

#endif /* CHIME_XDP_H */
