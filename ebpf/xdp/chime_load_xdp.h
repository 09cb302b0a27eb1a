/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * Definitions shared by chime-load's XDP program and its userspace loader
 * (mirrored in ebpf/src/load_xdp.rs; keep the two in step).
 */
#ifndef CHIME_LOAD_XDP_H
#define CHIME_LOAD_XDP_H

#include <linux/types.h>

/* The one entry of the `config` map. Addresses and masks in network byte
 * order; a family whose flag is clear is never steered. */
struct chime_load_config {
	__u16 port_be;      /* the server's UDP port: replies come from it */
	__u8 flags;         /* CHIME_LOAD_V4 | CHIME_LOAD_V6 */
	__u8 pad;
	__u32 v4_prefix;    /* the generator's source prefix, masked */
	__u32 v4_mask;
	__u32 pad2;
	__u8 v6_prefix[16];
	__u8 v6_mask[16];
};

#define CHIME_LOAD_V4 1u
#define CHIME_LOAD_V6 2u

/*
 * Indexes of the per-CPU `stats` array; every packet moves exactly one.
 * Append only: the numbers are part of the userspace ABI (LoadCounter).
 */
enum chime_load_stat {
	CHIME_LOAD_PASS_NOT_IP = 0,    /* not IPv4/IPv6 (ARP, VLAN-tagged, ...) */
	CHIME_LOAD_PASS_NOT_UDP,       /* IP but not UDP (ICMP, NDP, TCP, IPv6 ext) */
	CHIME_LOAD_PASS_FRAGMENT,      /* IPv4 fragment */
	CHIME_LOAD_PASS_OTHER,         /* UDP not from the server port to the prefix */
	CHIME_LOAD_PASS_MALFORMED,     /* truncated or invalid headers */
	CHIME_LOAD_PASS_NO_SOCKET,     /* a reply, but no AF_XDP socket on the queue */
	CHIME_LOAD_REDIRECT,           /* a reply, redirected to the queue's socket */
	CHIME_LOAD_STAT_COUNT,
};

#define CHIME_LOAD_XSKS_MAX 256

#endif /* CHIME_LOAD_XDP_H */
