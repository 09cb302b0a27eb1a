// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * chime's XDP program: steers NTP requests for the server's own addresses to
 * the AF_XDP socket of the receiving queue, stamped with their receive time;
 * everything else goes to the kernel untouched.
 *
 * Before steering it drops what chime would only drop later: requests that
 * are too short, not mode 3, from denied sources, or from a source over its
 * per-source rate (src_limit below).
 *
 * Built by build.sh (pinned clang-14, reproducible); the object is committed.
 */
#include <stdbool.h>

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "chime_xdp.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* NIC receive timestamp; resolved per driver, only in device-bound programs. */
extern int bpf_xdp_metadata_rx_timestamp(const struct xdp_md *ctx, __u64 *timestamp) __weak __ksym;

/* AF_XDP socket per RX queue, filled by userspace; the redirect target. */
struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, CHIME_XSKS_MAX);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

/* Runtime settings (port, mode filter): one entry written by the loader. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct chime_xdp_config);
} config SEC(".maps");

/* IPv4 addresses chime serves (network byte order); others pass to the kernel. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u8);
} server_v4 SEC(".maps");

/* IPv6 addresses chime serves; others pass to the kernel. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct chime_in6);
	__type(value, __u8);
} server_v6 SEC(".maps");

/* IPv4 source prefixes dropped here (chimed's deny ACL). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct chime_lpm_v4);
	__type(value, __u8);
} deny_v4 SEC(".maps");

/* IPv6 source prefixes dropped here (chimed's deny ACL). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct chime_lpm_v6);
	__type(value, __u8);
} deny_v6 SEC(".maps");

/*
 * Per-source flood guard in front of chimed's RFC 8633 limiter: for each
 * source address the time its next request is due. This is a token bucket
 * in its "virtual scheduling" form (GCRA): one u64 per source instead of
 * tokens plus a refill time, and no division in the program. A request
 * passes while the source's schedule is at most source_tolerance_ns ahead
 * of now, and moves it on by source_interval_ns; so a quiet source may send
 * `burst` requests back to back, then `rate` per second. The policy that
 * matters to clients (intervals of seconds, KoD) stays in userspace; this
 * only stops one source from filling the AF_XDP rings faster than a worker
 * empties them, before a worker ever sees its packets.
 *
 * LRU: when the table is full the sources seen least recently are
 * forgotten, and a forgotten source starts again with a full burst (the
 * guard fails open; a flood of spoofed sources can make it forget, but can
 * never make it drop another source's requests).
 *
 * Per CPU: each CPU keeps its own schedule for a source, so no atomics and
 * no lock. A NIC's RSS hashes a source's packets to one RX queue, so to one
 * CPU, and the limit is exact. The worst case is a source whose packets
 * land on all N CPUs (RSS hashing UDP ports while the flood varies its
 * source port, or a NIC without RSS spraying with RPS): it gets N x rate
 * and N x burst through. That is still bounded, a small multiple on usual
 * servers, and the userspace limiter stands behind it.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, CHIME_SRC_LIMIT_ENTRIES);
	__type(key, struct chime_src_key);
	__type(value, __u64);
} src_limit SEC(".maps");

/* Per-CPU packet counters indexed by enum chime_stat. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CHIME_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

#define VLAN_HLEN 4
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

static __always_inline void count(__u32 stat)
{
	__u64 *c = bpf_map_lookup_elem(&stats, &stat);

	if (c)
		*c += 1;
}

static __always_inline int verdict(__u32 stat, int action)
{
	count(stat);
	return action;
}

/*
 * Prepends the receive stamp (struct chime_xdp_meta) to the packet: userspace
 * finds it at the start of the AF_XDP frame and the Ethernet header right
 * after it. bpf_xdp_adjust_head, not bpf_xdp_adjust_meta: every XDP driver
 * has headroom, while the metadata area is missing on some drivers and some
 * kernels refuse adjust_meta outright (Linux 6.18.44-fc here). Returns true
 * when the header was prepended; when there is no room it counts META_FAILED
 * and userspace stamps the frame itself.
 */
static __always_inline bool stamp(struct xdp_md *ctx, bool hw)
{
	__u64 rx_ns = 0;
	__u32 flags = 0;
	struct chime_xdp_meta *meta;

	if (hw) {
		__u64 ts = 0;

		if (bpf_xdp_metadata_rx_timestamp(ctx, &ts) == 0 && ts != 0) {
			rx_ns = ts;
			flags = CHIME_META_HW;
		}
	}
	if (!flags)
		rx_ns = bpf_ktime_get_tai_ns();

	if (bpf_xdp_adjust_head(ctx, -(int)sizeof(struct chime_xdp_meta)) != 0) {
		count(CHIME_STAT_META_FAILED);
		return false;
	}
	meta = (void *)(long)ctx->data;
	if ((void *)(meta + 1) > (void *)(long)ctx->data_end) {
		/* Cannot happen (the packet grew by the header); for the verifier. */
		count(CHIME_STAT_META_FAILED);
		return true;
	}
	meta->rx_ns = rx_ns;
	meta->flags = flags;
	meta->magic = CHIME_META_MAGIC;
	count(flags ? CHIME_STAT_STAMP_HW : CHIME_STAT_STAMP_SW);
	return true;
}

/* Result of the shared checks below: not decided yet, go on. */
#define CHIME_CONTINUE -1

/* The UDP destination port chime serves, network byte order. */
static __always_inline __u16 served_port(const struct chime_xdp_config *cfg)
{
	return cfg && cfg->port_be ? cfg->port_be : bpf_htons(123);
}

/* Drops of packets that are ours (destination checked): too short for NTP,
 * or not a client request when so configured. */
static __always_inline int check_payload(struct udphdr *udp, void *data_end,
					 const struct chime_xdp_config *cfg)
{
	__u8 *payload = (__u8 *)(udp + 1);

	if (bpf_ntohs(udp->len) < sizeof(*udp) + CHIME_NTP_MIN_LEN ||
	    (void *)(payload + CHIME_NTP_MIN_LEN) > data_end)
		return verdict(CHIME_STAT_DROP_SHORT, XDP_DROP);
	if (cfg && cfg->drop_non_client && (payload[0] & 7) != CHIME_NTP_MODE_CLIENT)
		return verdict(CHIME_STAT_DROP_NOT_CLIENT, XDP_DROP);
	return CHIME_CONTINUE;
}

/* True when `src` is over its rate (see src_limit); otherwise charges it
 * one request. */
static __always_inline bool over_source_limit(const struct chime_xdp_config *cfg,
					      const struct chime_src_key *src)
{
	__u64 now, due, *next;

	if (!cfg || !cfg->source_interval_ns)
		return false;
	now = bpf_ktime_get_ns();
	next = bpf_map_lookup_elem(&src_limit, src);
	if (!next) {
		/* New source (or forgotten, or new on this CPU's side of the
		 * entry: then the slot reads 0 below). A failed insert lets
		 * the packet through. */
		due = now + cfg->source_interval_ns;
		bpf_map_update_elem(&src_limit, src, &due, BPF_ANY);
		return false;
	}
	due = *next > now ? *next : now;
	/* Further ahead than this config can put a source: a schedule made
	 * under other settings before a reload. Start the source afresh, as
	 * if new, so a raised limit applies at once (a lowered one gives it
	 * at most its new burst). */
	if (due - now > cfg->source_tolerance_ns + cfg->source_interval_ns)
		due = now;
	if (due - now > cfg->source_tolerance_ns)
		return true;
	*next = due + cfg->source_interval_ns;
	return false;
}

/* Stamps and hands the packet to the queue's AF_XDP socket, if there is one;
 * without one the kernel gets the packet as it came. */
static __always_inline int steer(struct xdp_md *ctx, bool hw)
{
	bool stamped;
	long ret;

	/* Packet pointers are invalid after this (adjust_head). */
	stamped = stamp(ctx, hw);
	ret = bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
	if (ret == XDP_REDIRECT)
		return verdict(CHIME_STAT_REDIRECT, XDP_REDIRECT);
	if (stamped && bpf_xdp_adjust_head(ctx, (int)sizeof(struct chime_xdp_meta)) != 0)
		return verdict(CHIME_STAT_PASS_NO_SOCKET, XDP_DROP);
	return verdict(CHIME_STAT_PASS_NO_SOCKET, (int)ret);
}

static __always_inline int handle_v4(struct xdp_md *ctx, bool hw, struct iphdr *ip, void *data_end)
{
	struct chime_xdp_config *cfg;
	struct chime_src_key src;
	struct chime_lpm_v4 key;
	struct udphdr *udp;
	__u32 zero = 0;
	__u32 ihl;
	int v;

	if ((void *)(ip + 1) > data_end)
		return verdict(CHIME_STAT_PASS_MALFORMED, XDP_PASS);
	ihl = ip->ihl;
	if (ip->version != 4 || ihl < 5)
		return verdict(CHIME_STAT_PASS_MALFORMED, XDP_PASS);
	if (ip->protocol != IPPROTO_UDP)
		return verdict(CHIME_STAT_PASS_NOT_UDP, XDP_PASS);
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return verdict(CHIME_STAT_PASS_FRAGMENT, XDP_PASS);
	udp = (void *)ip + ihl * 4;
	if ((void *)(udp + 1) > data_end)
		return verdict(CHIME_STAT_PASS_MALFORMED, XDP_PASS);

	cfg = bpf_map_lookup_elem(&config, &zero);
	if (udp->dest != served_port(cfg))
		return verdict(CHIME_STAT_PASS_OTHER_PORT, XDP_PASS);
	/* Only the server's own addresses: the host may route or serve others. */
	if (!bpf_map_lookup_elem(&server_v4, &ip->daddr))
		return verdict(CHIME_STAT_PASS_OTHER_DEST, XDP_PASS);

	v = check_payload(udp, data_end, cfg);
	if (v != CHIME_CONTINUE)
		return v;
	key.prefixlen = 32;
	key.addr = ip->saddr;
	if (bpf_map_lookup_elem(&deny_v4, &key))
		return verdict(CHIME_STAT_DROP_DENIED, XDP_DROP);
	/* IPv4-mapped: ::ffff:a.b.c.d */
	__builtin_memset(&src, 0, sizeof(src));
	src.addr[10] = 0xff;
	src.addr[11] = 0xff;
	__builtin_memcpy(&src.addr[12], &ip->saddr, 4);
	if (over_source_limit(cfg, &src))
		return verdict(CHIME_STAT_DROP_FLOOD, XDP_DROP);
	return steer(ctx, hw);
}

static __always_inline int handle_v6(struct xdp_md *ctx, bool hw, struct ipv6hdr *ip6, void *data_end)
{
	struct chime_xdp_config *cfg;
	struct chime_src_key src;
	struct chime_lpm_v6 key;
	struct chime_in6 daddr;
	struct udphdr *udp;
	__u32 zero = 0;
	int v;

	if ((void *)(ip6 + 1) > data_end)
		return verdict(CHIME_STAT_PASS_MALFORMED, XDP_PASS);
	if (ip6->version != 6)
		return verdict(CHIME_STAT_PASS_MALFORMED, XDP_PASS);
	switch (ip6->nexthdr) {
	case IPPROTO_UDP:
		break;
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_FRAGMENT:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_ESP:
	case 135: /* Mobility */
	case 139: /* HIP */
	case 140: /* Shim6 */
		return verdict(CHIME_STAT_PASS_IPV6_EXT, XDP_PASS);
	default:
		return verdict(CHIME_STAT_PASS_NOT_UDP, XDP_PASS);
	}
	udp = (void *)(ip6 + 1);
	if ((void *)(udp + 1) > data_end)
		return verdict(CHIME_STAT_PASS_MALFORMED, XDP_PASS);

	cfg = bpf_map_lookup_elem(&config, &zero);
	if (udp->dest != served_port(cfg))
		return verdict(CHIME_STAT_PASS_OTHER_PORT, XDP_PASS);
	/* Only the server's own addresses: the host may route or serve others. */
	__builtin_memcpy(daddr.addr, &ip6->daddr, sizeof(daddr.addr));
	if (!bpf_map_lookup_elem(&server_v6, &daddr))
		return verdict(CHIME_STAT_PASS_OTHER_DEST, XDP_PASS);

	v = check_payload(udp, data_end, cfg);
	if (v != CHIME_CONTINUE)
		return v;
	key.prefixlen = 128;
	__builtin_memcpy(key.addr, &ip6->saddr, sizeof(key.addr));
	if (bpf_map_lookup_elem(&deny_v6, &key))
		return verdict(CHIME_STAT_DROP_DENIED, XDP_DROP);
	__builtin_memcpy(src.addr, &ip6->saddr, sizeof(src.addr));
	if (over_source_limit(cfg, &src))
		return verdict(CHIME_STAT_DROP_FLOOD, XDP_DROP);
	return steer(ctx, hw);
}

static __always_inline int chime_handle(struct xdp_md *ctx, bool hw)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	void *l3 = eth + 1;
	__u16 proto;

	if (l3 > data_end)
		return verdict(CHIME_STAT_PASS_MALFORMED, XDP_PASS);
	proto = eth->h_proto;

	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		/* One tag: TCI then the encapsulated EtherType. */
		__be16 *tag = l3;

		if ((void *)(tag + 2) > data_end)
			return verdict(CHIME_STAT_PASS_MALFORMED, XDP_PASS);
		proto = tag[1];
		l3 = tag + 2;
	}

	if (proto == bpf_htons(ETH_P_IP))
		return handle_v4(ctx, hw, l3, data_end);
	if (proto == bpf_htons(ETH_P_IPV6))
		return handle_v6(ctx, hw, l3, data_end);
	return verdict(CHIME_STAT_PASS_NOT_IP, XDP_PASS);
}

/* Software receive stamp (bpf_ktime_get_tai_ns); loads on any device. */
SEC("xdp")
int chime_xdp(struct xdp_md *ctx)
{
	return chime_handle(ctx, false);
}

/* NIC hardware receive stamp where the driver gives one; load device-bound. */
SEC("xdp")
int chime_xdp_hw(struct xdp_md *ctx)
{
	return chime_handle(ctx, true);
}
