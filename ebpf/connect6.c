/* cgroup/connect6 on each captured pod's cgroup: a dual-stack socket (AF_INET6, what Java and
 * Node.js open by default) reaches an IPv4 destination through its v4-mapped address
 * (::ffff:a.b.c.d). Its traffic is IPv4, but its connect passes this hook, not connect4's:
 * without this program such a connection would leave the pod uncaptured, in plaintext. Handled
 * as connect4.c does, in v4-mapped form.
 *
 * IPv6 itself is not supported yet: an IPv6 TCP connect (but to ::1) is refused (EPERM), as
 * iptables mode refuses it, so that nothing leaves the pod uncaptured.
 */
#include "veil.h"

int veil_connect6(struct bpf_sock_addr *ctx)
{
    if (ctx->type != VEIL_SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
        return 1;
    if (!veil_v4_mapped(ctx->user_ip6)) {
        __u32 loopback = ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
                         ctx->user_ip6[2] == 0 && ctx->user_ip6[3] == veil_htonl(1);
        return loopback ? 1 : 0;
    }
    if (!veil_outbound(ctx, ctx->user_ip6[3]))
        return 1;
    ctx->user_ip6[3] = veil_htonl(VEIL_LOOPBACK);
    ctx->user_port = veil_htons(VEIL_OUTBOUND_PORT);
    return 1;
}
