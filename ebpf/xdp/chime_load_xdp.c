// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * chime-load's XDP program, on the load generator's own interface: steers the
 * server's replies to the generator's simulated clients (UDP from the
 * server's port to an address inside the configured source prefix) to the
 * AF_XDP socket of the receiving queue, stamped with their receive time in
 * the same metadata layout as chime_xdp; everything else (ARP, NDP, ICMP,
 * the NTS-KE connection, the host's own traffic) goes to the kernel.
 *
 * A program of its own rather than a mode of chime_xdp: it matches the
 * source port and a destination prefix where chime_xdp matches the
 * destination port and a set of addresses, and the server's map layout and
 * counters stay an ABI of the server alone.
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
#include "chime_load_xdp.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* AF_XDP socket per RX queue, filled by chime-load; the redirect target. */
struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, CHIME_LOAD_XSKS_MAX);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

/* Server port and source prefixes: one entry written by the loader. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct chime_load_config);
} config SEC(".maps");

/* Per-CPU packet counters indexed by enum chime_load_stat. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CHIME_LOAD_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

static __always_inline int verdict(__u32 stat, int action)
{
	__u64 *c = bpf_map_lookup_elem(&stats, &stat);

	if (c)
		*c += 1;
	return action;
}

/* Stamps (software, CLOCK_TAI, chime_xdp's layout; unless `meta` is false)
 * and redirects. */
static __always_inline int steer(struct xdp_md *ctx, bool meta_wanted)
{
	__u64 rx_ns = bpf_ktime_get_tai_ns();
	struct chime_xdp_meta *meta;
	long ret;

	if (meta_wanted && bpf_xdp_adjust_meta(ctx, -(int)sizeof(struct chime_xdp_meta)) == 0) {
		meta = (void *)(long)ctx->data_meta;
		if ((void *)(meta + 1) <= (void *)(long)ctx->data) {
			meta->rx_ns = rx_ns;
			meta->flags = 0;
			meta->magic = CHIME_META_MAGIC;
		}
	}
	ret = bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
	if (ret == XDP_REDIRECT)
		return verdict(CHIME_LOAD_REDIRECT, XDP_REDIRECT);
	return verdict(CHIME_LOAD_PASS_NO_SOCKET, (int)ret);
}

static __always_inline int handle_v4(struct xdp_md *ctx, bool meta, struct iphdr *ip, void *data_end,
				     const struct chime_load_config *cfg)
{
	struct udphdr *udp;
	__u32 ihl;

	if ((void *)(ip + 1) > data_end)
		return verdict(CHIME_LOAD_PASS_MALFORMED, XDP_PASS);
	ihl = ip->ihl;
	if (ip->version != 4 || ihl < 5)
		return verdict(CHIME_LOAD_PASS_MALFORMED, XDP_PASS);
	if (ip->protocol != IPPROTO_UDP)
		return verdict(CHIME_LOAD_PASS_NOT_UDP, XDP_PASS);
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return verdict(CHIME_LOAD_PASS_FRAGMENT, XDP_PASS);
	udp = (void *)ip + ihl * 4;
	if ((void *)(udp + 1) > data_end)
		return verdict(CHIME_LOAD_PASS_MALFORMED, XDP_PASS);
	if (!(cfg->flags & CHIME_LOAD_V4) || udp->source != cfg->port_be ||
	    (ip->daddr & cfg->v4_mask) != cfg->v4_prefix)
		return verdict(CHIME_LOAD_PASS_OTHER, XDP_PASS);
	return steer(ctx, meta);
}

static __always_inline int handle_v6(struct xdp_md *ctx, bool meta, struct ipv6hdr *ip6, void *data_end,
				     const struct chime_load_config *cfg)
{
	struct udphdr *udp;
	__u64 a0, a1, m0, m1, p0, p1;

	if ((void *)(ip6 + 1) > data_end)
		return verdict(CHIME_LOAD_PASS_MALFORMED, XDP_PASS);
	if (ip6->version != 6)
		return verdict(CHIME_LOAD_PASS_MALFORMED, XDP_PASS);
	/* Extension headers (and everything else) go to the kernel. */
	if (ip6->nexthdr != IPPROTO_UDP)
		return verdict(CHIME_LOAD_PASS_NOT_UDP, XDP_PASS);
	udp = (void *)(ip6 + 1);
	if ((void *)(udp + 1) > data_end)
		return verdict(CHIME_LOAD_PASS_MALFORMED, XDP_PASS);
	if (!(cfg->flags & CHIME_LOAD_V6) || udp->source != cfg->port_be)
		return verdict(CHIME_LOAD_PASS_OTHER, XDP_PASS);
	__builtin_memcpy(&a0, &ip6->daddr.s6_addr[0], 8);
	__builtin_memcpy(&a1, &ip6->daddr.s6_addr[8], 8);
	__builtin_memcpy(&m0, &cfg->v6_mask[0], 8);
	__builtin_memcpy(&m1, &cfg->v6_mask[8], 8);
	__builtin_memcpy(&p0, &cfg->v6_prefix[0], 8);
	__builtin_memcpy(&p1, &cfg->v6_prefix[8], 8);
	if ((a0 & m0) != p0 || (a1 & m1) != p1)
		return verdict(CHIME_LOAD_PASS_OTHER, XDP_PASS);
	return steer(ctx, meta);
}

static __always_inline int load_handle(struct xdp_md *ctx, bool meta)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct chime_load_config *cfg;
	struct ethhdr *eth = data;
	__u32 zero = 0;

	if ((void *)(eth + 1) > data_end)
		return verdict(CHIME_LOAD_PASS_MALFORMED, XDP_PASS);
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return verdict(CHIME_LOAD_PASS_OTHER, XDP_PASS);
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return handle_v4(ctx, meta, (void *)(eth + 1), data_end, cfg);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return handle_v6(ctx, meta, (void *)(eth + 1), data_end, cfg);
	return verdict(CHIME_LOAD_PASS_NOT_IP, XDP_PASS);
}

SEC("xdp")
int chime_load_xdp(struct xdp_md *ctx)
{
	return load_handle(ctx, true);
}

/* Without the stamp, for kernels that refuse bpf_xdp_adjust_meta to XDP
 * programs: chime-load then stamps each batch when it takes it. */
SEC("xdp")
int chime_load_xdp_nometa(struct xdp_md *ctx)
{
	return load_handle(ctx, false);
}
