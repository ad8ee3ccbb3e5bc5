//! End-to-end tests of the relay: its network (scripts/relay-net), the relay partition,
//! the mediation server and the cloud server (docs/tunnel-protocol.md, docs/relay.md).
//!
//! Tests named `netns_*` build network namespaces (root, `/dev/net/tun`, `ip`, `nft`);
//! `kvm_netns_*` also boot partitions. `scripts/test` skips them by name where that is
//! impossible, loudly, and counts them as skipped.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::relaynet::{
    can_connect, in_netns, listen_in, require_netns, RelayNet, LAN_HOST_IP, MEDIATOR_IP,
};

#[test]
fn netns_the_firewall_lets_the_lan_out_and_keeps_the_wan_out() {
    require_netns();
    let net = RelayNet::up(1);
    // The LAN reaches the WAN, and the answer comes back (an established connection).
    let wan_addr: SocketAddr = format!("{MEDIATOR_IP}:7443").parse().unwrap();
    let wan = listen_in(&net.ns("wan"), wan_addr);
    let server = std::thread::spawn(move || {
        let (mut c, _) = wan.accept().unwrap();
        c.write_all(b"hello lan").unwrap();
    });
    let got = in_netns(&net.ns("host"), move || {
        let mut s = std::net::TcpStream::connect_timeout(&wan_addr, Duration::from_secs(3))
            .expect("the LAN reaches the WAN");
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        buf
    });
    server.join().unwrap();
    assert_eq!(got, "hello lan");
    // The WAN has a route to the LAN, but the firewall drops its connections.
    let lan_addr: SocketAddr = format!("{LAN_HOST_IP}:7000").parse().unwrap();
    let _lan = listen_in(&net.ns("host"), lan_addr);
    assert!(
        !can_connect(&net.ns("wan"), lan_addr, Duration::from_secs(1)),
        "a connection from the WAN into the LAN got through"
    );
    let rules = net.sh("lan", "nft list table inet duplex_fw");
    let dropped: u64 = rules
        .split("counter packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the drop rule's counter");
    assert!(dropped >= 1, "the firewall counted no drop: {rules}");
    // The namespaces go away with the network.
    let ns = net.ns("lan");
    drop(net);
    assert!(!std::path::Path::new(&format!("/run/netns/{ns}")).exists());
}
