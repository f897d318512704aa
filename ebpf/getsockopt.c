/* cgroup/getsockopt on the agent's own cgroup: answer SO_ORIGINAL_DST for connections that eBPF
 * capture redirected, so the proxy asks the same question in both capture modes. Only steps in
 * when the kernel itself had no answer (no conntrack entry).
 *  - accepted on 15001: the original destination recorded by connect4.c/sockops.c;
 *  - anything else (inbound SYNs assigned by tc_ingress.c keep their destination): the
 *    connection's own local address.
 */
#include "veil.h"

int veil_getsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->level != 0 /* SOL_IP */ || ctx->optname != VEIL_SO_ORIGINAL_DST)
        return 1;
    if (ctx->retval == 0)
        return 1; /* conntrack answered */
    struct bpf_sock *sk = ctx->sk;
    if (!sk || sk->family != 2 /* AF_INET */)
        return 1;
    struct veil_sockaddr_in *out = ctx->optval;
    if ((void *)(out + 1) > ctx->optval_end)
        return 1;
    struct veil_orig orig = {};
    if (sk->src_port == VEIL_OUTBOUND_PORT) {
        struct veil_conn_key key = {
            .netns = bpf_get_netns_cookie(ctx),
            .ip = sk->dst_ip4,
            .port = veil_ntohs((__u16)sk->dst_port),
        };
        struct veil_orig *found = veil_conn_orig.lookup(&key);
        if (!found) {
            veil_count(VEIL_ORIG_MISSING);
            return 1;
        }
        orig = *found;
        veil_conn_orig.delete(&key);
    } else {
        orig.ip = sk->src_ip4;
        orig.port = veil_htons((__u16)sk->src_port);
    }
    out->family = 2;
    out->port = orig.port;
    out->addr = orig.ip;
    __builtin_memset(out->zero, 0, sizeof(out->zero));
    /* Separate 32-bit stores: clang would merge them into one 64-bit store the verifier refuses. */
    *(volatile __s32 *)&ctx->optlen = sizeof(*out);
    *(volatile __s32 *)&ctx->retval = 0;
    veil_count(VEIL_ORIG_SERVED);
    return 1;
}
