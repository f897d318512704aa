/* tc ingress on the pod's eth0: steer inbound plaintext TCP to the agent's 15006 listener with
 * bpf_sk_assign (the connection keeps its real destination, as TPROXY would). HBONE (15008) and
 * the kubelet's probes pass untouched. No listener (agent down): the SYN is dropped, so the
 * connection fails instead of reaching the app unauthenticated. IPv6 TCP is not supported yet
 * and is dropped (iptables mode rejects it): nothing reaches the app uncaptured.
 */
#include "veil.h"

int veil_tc_ingress(struct __sk_buff *skb)
{
    struct iphdr *ip;
    struct tcphdr *tcp = veil_tcp(skb, &ip);
    if (!tcp)
        return veil_ipv6_tcp(skb) ? TC_ACT_SHOT : TC_ACT_OK;
    if (!tcp->syn || tcp->ack)
        return TC_ACT_OK; /* established connections find their sockets as usual */
    if (tcp->dest == veil_htons(VEIL_HBONE_PORT) || ip->saddr == veil_htonl(VEIL_PROBE_SOURCE))
        return TC_ACT_OK;
    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = ip->saddr;
    tuple.ipv4.daddr = ip->daddr;
    tuple.ipv4.sport = tcp->source;
    tuple.ipv4.dport = veil_htons(VEIL_INBOUND_PLAIN_PORT);
    struct bpf_sock *sk =
        bpf_sk_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk) {
        veil_count(VEIL_NO_LISTENER);
        return TC_ACT_SHOT;
    }
    long err = sk->state == BPF_TCP_LISTEN ? bpf_sk_assign(skb, sk, 0) : -1;
    bpf_sk_release(sk);
    if (err) {
        veil_count(VEIL_ASSIGN_FAILED);
        return TC_ACT_SHOT;
    }
    veil_count(VEIL_STEERED);
    return TC_ACT_OK;
}
