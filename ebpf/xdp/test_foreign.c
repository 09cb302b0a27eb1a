// SPDX-License-Identifier: (MIT OR GPL-2.0)
/* A stand-in for somebody else's XDP program, used by the loader's tests. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual MIT/GPL";

SEC("xdp")
int foreign_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
