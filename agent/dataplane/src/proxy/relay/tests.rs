//! The relay against real loopback sockets: bytes, half-closes, buffers
//! held only while data moves, the idle timeout.
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;

/// A connected pair of loopback sockets.
async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

/// client ⇄ [relay] ⇄ server: the ends the test holds, and the relay.
async fn relayed(
    buffers: &Buffers,
    idle: Duration,
) -> (
    TcpStream,
    TcpStream,
    tokio::task::JoinHandle<Result<Relayed, RelayError>>,
) {
    let (client, mut near) = pair().await;
    let (mut far, server) = pair().await;
    let b = buffers.clone();
    let task = tokio::spawn(async move { relay(&mut near, &mut far, &b, idle, &[], &[]).await });
    (client, server, task)
}

#[tokio::test]
async fn bytes_half_closes_and_buffers_held_only_while_data_moves() {
    let buffers = Buffers::new(256 << 10, 1 << 30);
    let (mut client, mut server, task) = relayed(&buffers, Duration::from_secs(60)).await;
    // Idle: no buffer is out (small ones are not counted; large are).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(buffers.large_out(), 0);
    // Bulk one way: reads fill the small buffer, then a large one.
    let body = vec![7u8; 8 << 20];
    let writer = tokio::spawn(async move {
        client.write_all(&body).await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        back
    });
    let mut got = vec![0u8; 8 << 20];
    server.read_exact(&mut got).await.unwrap();
    assert!(got.iter().all(|&b| b == 7));
    // The client's half-close reached the server.
    assert_eq!(server.read(&mut [0u8; 1]).await.unwrap(), 0);
    server.write_all(b"done").await.unwrap();
    server.shutdown().await.unwrap();
    assert_eq!(writer.await.unwrap(), b"done");
    let n = task.await.unwrap().unwrap();
    assert_eq!(n.client_to_server, 8 << 20);
    assert_eq!(n.server_to_client, 4);
    assert_eq!(buffers.large_out(), 0, "every buffer given back");
}

#[tokio::test]
async fn a_relay_dropped_mid_transfer_gives_its_buffers_back() {
    let buffers = Buffers::new(256 << 10, 1 << 30);
    let (mut client, server, task) = relayed(&buffers, Duration::from_secs(60)).await;
    // The server never reads: the relay holds a full large buffer.
    let writer = tokio::spawn(async move {
        let _ = client.write_all(&vec![1u8; 32 << 20]).await;
        client
    });
    for _ in 0..100 {
        if buffers.large_out() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(buffers.large_out() > 0, "a large buffer is out");
    // Cut, as a policy change cuts a connection.
    task.abort();
    let _ = task.await;
    assert_eq!(buffers.large_out(), 0, "given back when dropped");
    writer.abort();
    drop(server);
}

#[tokio::test]
async fn large_buffers_stay_within_their_budget() {
    // Room for one large buffer: the second relay moves data with
    // small ones.
    let buffers = Buffers::new(64 << 10, 64 << 10);
    let mut ends = Vec::new();
    for _ in 0..2 {
        ends.push(relayed(&buffers, Duration::from_secs(60)).await);
    }
    for (client, server, _) in &mut ends {
        let body = vec![1u8; 1 << 20];
        let (r, w) = (server, client);
        let (sent, got) = tokio::join!(w.write_all(&body), async {
            let mut got = vec![0u8; 1 << 20];
            r.read_exact(&mut got).await.map(|_| got)
        });
        sent.unwrap();
        assert_eq!(got.unwrap(), body);
        assert!(buffers.large_out() <= 64 << 10);
    }
}

#[tokio::test]
async fn silence_both_ways_for_the_idle_timeout_resets_both_sides() {
    let buffers = Buffers::new(64 << 10, 1 << 20);
    let idle = Duration::from_millis(300);
    // Talking every 100 ms: never idle.
    let (mut client, mut server, task) = relayed(&buffers, idle).await;
    for _ in 0..8 {
        client.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        server.read_exact(&mut one).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!task.is_finished(), "a relay that talks stays open");
    // Then silent: both sides are reset.
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err, RelayError::Idle(_)), "{err}");
    let mut buf = [0u8; 1];
    assert!(
        client
            .read(&mut buf)
            .await
            .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionReset)
    );
    assert!(
        server
            .read(&mut buf)
            .await
            .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionReset)
    );
    // A half-closed relay whose other side never speaks goes too.
    let (mut client, _server, task) = relayed(&buffers, idle).await;
    client.shutdown().await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("a half-open relay is closed")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, RelayError::Idle(_)));
}
