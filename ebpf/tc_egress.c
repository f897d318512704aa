/* tc egress on the pod's eth0: the app's replies to connections the agent opened with the
 * original client's address (IP_TRANSPARENT) would leave the pod towards that client. When a
 * local socket owns the packet's 4-tuple, it is the agent's: mark the packet and hand it to lo,
 * where `ip rule fwmark 0x111 lookup 100` + `local 0/0 dev lo table 100` deliver it (what
 * iptables mode does with a connmark).
 */
#include "veil.h"

int veil_tc_egress(struct __sk_buff *skb)
{
    if ((skb->mark & VEIL_MARK_MASK) == VEIL_AGENT_MARK)
        return TC_ACT_OK; /* the agent's own traffic */
    struct iphdr *ip;
    struct tcphdr *tcp = veil_tcp(skb, &ip);
    if (!tcp)
        return TC_ACT_OK;
    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = ip->saddr;
    tuple.ipv4.daddr = ip->daddr;
    tuple.ipv4.sport = tcp->source;
    tuple.ipv4.dport = tcp->dest;
    struct bpf_sock *sk =
        bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return TC_ACT_OK;
    int owned = sk->state != BPF_TCP_LISTEN;
    bpf_sk_release(sk);
    if (!owned)
        return TC_ACT_OK;
    __u8 lo_mac[ETH_ALEN] = {};
    if (bpf_skb_store_bytes(skb, 0, lo_mac, ETH_ALEN, 0))
        return TC_ACT_SHOT;
    skb->mark = (skb->mark & ~VEIL_MARK_MASK) | VEIL_CONN_MARK;
    veil_count(VEIL_REPLIES_LOCAL);
    return bpf_redirect(VEIL_LO_IFINDEX, BPF_F_INGRESS);
}
