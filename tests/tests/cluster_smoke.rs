//! Proves the cluster test infrastructure works before anything is built on it: objects
//! written through one Garage node are read through another, the 2-of-3 quorum keeps serving
//! with a node down, and HAProxy really rotates over its backends and carries S3 traffic.
//! Needs the `garage` binary and HAProxy (README, "Tests"); fails, never skips, without them.

use std::net::SocketAddr;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStoreExt, RetryConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xfer_tests::cluster::{GARAGE_NODES, HaProxy, S3Settings, garage, unique_prefix};
use xfer_tests::noise;

/// An S3 client for `s3` with retries off (a request that needs a retry to succeed is a
/// failure here, or a dead node could pass for a live quorum) and no idle connections kept,
/// so that through a balancer each request is a new connection and goes to the next node.
fn client(s3: &S3Settings) -> AmazonS3 {
    AmazonS3Builder::new()
        .with_client_options(ClientOptions::new().with_pool_max_idle_per_host(0))
        .with_endpoint(&s3.endpoint)
        .with_region(&s3.region)
        .with_bucket_name(&s3.bucket)
        .with_access_key_id(&s3.access_key_id)
        .with_secret_access_key(&s3.secret_access_key)
        .with_allow_http(true)
        .with_retry(RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        })
        .build()
        .expect("S3 client")
}

async fn put(store: &AmazonS3, key: &Path, data: &[u8]) {
    store
        .put(key, data.to_vec().into())
        .await
        .unwrap_or_else(|e| panic!("PUT {key} through {store}: {e}"));
}

async fn get(store: &AmazonS3, key: &Path) -> Vec<u8> {
    store
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("GET {key} through {store}: {e}"))
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("GET {key} body through {store}: {e}"))
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_put_through_one_node_reads_back_through_every_other() {
    let g = garage();
    let _all = g.all_up();
    let key = Path::from(format!("{}/object", unique_prefix("any-node")));
    // More than one Garage block (1 MiB), so the data is really spread and reassembled.
    let data = noise(3 << 20, 11);
    put(&client(&g.node_s3(2)), &key, &data).await;
    for node in 1..=GARAGE_NODES {
        assert!(
            get(&client(&g.node_s3(node)), &key).await == data,
            "node {node} returned other bytes"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_node_down_put_and_get_still_succeed() {
    let g = garage();
    let prefix = unique_prefix("quorum");
    let before = Path::from(format!("{prefix}/before"));
    let during = Path::from(format!("{prefix}/during"));
    let (a, b) = (noise(1 << 20, 21), noise((1 << 20) + 7, 22));
    put(&client(&g.node_s3(1)), &before, &a).await;

    let down = g.stop_node(3);
    put(&client(&g.node_s3(1)), &during, &b).await;
    assert!(get(&client(&g.node_s3(2)), &during).await == b);
    assert!(get(&client(&g.node_s3(2)), &before).await == a);
    down.start();

    // The node that missed the write serves it once back (a read quorum includes it).
    assert!(get(&client(&g.node_s3(3)), &during).await == b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_through_haproxy_round_robin_over_the_three_nodes() {
    let g = garage();
    let _all = g.all_up();
    let lb = HaProxy::start(
        &(1..=GARAGE_NODES)
            .map(|n| g.node_addr(n))
            .collect::<Vec<_>>(),
    );
    let store = client(&S3Settings {
        endpoint: lb.http_endpoint(),
        ..g.s3()
    });
    let prefix = unique_prefix("haproxy");
    // Each request is a new connection, so the PUTs and GETs rotate over the three nodes and
    // most objects are read back through another node than the one that took them.
    for i in 0..9u64 {
        let key = Path::from(format!("{prefix}/{i}"));
        let data = noise(1000 + i as usize * 997, i);
        put(&store, &key, &data).await;
        assert!(get(&store, &key).await == data, "object {i} differs");
    }
}

/// A backend that tells each connection its own number, to see where HAProxy sends it.
async fn numbered_backend(n: u8) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = conn.write_all(&[n]).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_sends_connections_to_each_backend_in_turn() {
    let mut backends = Vec::new();
    let mut tasks = Vec::new();
    for n in 1..=3 {
        let (addr, task) = numbered_backend(n).await;
        backends.push(addr);
        tasks.push(task);
    }
    let lb = HaProxy::start(&backends);
    let mut seen = Vec::new();
    for _ in 0..6 {
        let mut conn = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
        let mut which = [0u8];
        conn.read_exact(&mut which).await.unwrap();
        seen.push(which[0]);
    }
    // Round robin: three consecutive connections reach three different backends.
    let mut first = seen[..3].to_vec();
    first.sort_unstable();
    assert_eq!(first, [1, 2, 3], "connections went to {seen:?}");
    assert_eq!(seen[..3], seen[3..], "not a rotation: {seen:?}");
    for t in tasks {
        t.abort();
    }
}
