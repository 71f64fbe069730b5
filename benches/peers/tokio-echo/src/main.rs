//! tokio-tungstenite echo server on a current-thread runtime: the baseline wsrelay's echo is
//! compared against in docs/benchmarks.md. Usage: `tokio-echo 127.0.0.1:9002`.
//! Prints "listening on ADDR" once bound.

use futures_util::{StreamExt, TryStreamExt};
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9002".into());
    let listener = TcpListener::bind(&addr).await.expect("bind");
    println!("listening on {}", listener.local_addr().expect("addr"));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            // `forward` feeds messages into the sink and flushes when the stream has nothing
            // more ready: replies to one read leave in one write, as in wsrelay.
            let (tx, rx) = ws.split();
            let _ = rx
                .try_filter(|m| std::future::ready(m.is_text() || m.is_binary()))
                .forward(tx)
                .await;
        });
    }
}
