//! The WebSocket endpoint for browsers (`--ws ADDR`): `GET /v1/sync` upgrades to a WebSocket
//! that carries the same protocol as QUIC, one binary message per frame
//! (docs/PROTOCOL.md, "Transport"). Sessions go to the same hub thread, with the same
//! handshake, grants, limits and refusals as QUIC sessions.

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use syncline_core::wire::MAX_FRAME;
use syncline_net::NetError;

use crate::metrics::Handle;

/// The endpoint's routes.
pub fn router(handle: Handle) -> Router {
    Router::new()
        .route("/v1/sync", get(upgrade))
        .with_state(handle)
}

/// Serves `app` as HTTPS (`wss://`) on `listener` until `stop` fires: each connection's TLS
/// handshake must end within 10 s, then HTTP/1.1 with upgrades (the WebSocket) runs over it.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    config: std::sync::Arc<rustls::ServerConfig>,
    app: Router,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = &mut stop => return Ok(()),
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, go on serving.
                    tracing::warn!(error = %e, "accepting a WebSocket connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .with_upgrades()
                .await
            {
                tracing::debug!(%remote, error = %e, "HTTPS connection ended");
            }
        });
    }
}

async fn upgrade(State(handle): State<Handle>, ws: WebSocketUpgrade) -> Response {
    // One frame per message: nothing larger than the largest frame is read into memory.
    ws.max_message_size(MAX_FRAME + 4)
        .max_frame_size(MAX_FRAME + 4)
        .on_upgrade(move |socket| session(handle, socket))
}

async fn session(handle: Handle, socket: WebSocket) {
    let (sink, stream) = socket.split();
    let incoming = stream.filter_map(|m| async move {
        match m {
            Ok(WsMessage::Binary(bytes)) => Some(Ok(Some(bytes.to_vec()))),
            Ok(WsMessage::Text(_)) => Some(Ok(None)),
            // Control messages: the WebSocket library answers pings itself.
            Ok(WsMessage::Ping(_) | WsMessage::Pong(_)) => None,
            Ok(WsMessage::Close(_)) => Some(Err(NetError::Stopped)),
            Err(e) => Some(Err(NetError::Config(format!("websocket: {e}")))),
        }
    });
    // A Close ends the stream like a closed connection.
    let incoming = Box::pin(incoming.take_while(|r| {
        let go = !matches!(r, Err(NetError::Stopped));
        async move { go }
    }));
    let outgoing =
        sink.with(
            |frame: Vec<u8>| async move { Ok::<_, axum::Error>(WsMessage::Binary(frame.into())) },
        );
    let outgoing = Box::pin(outgoing);
    if let Err(e) = handle.serve_frames(incoming, outgoing).await {
        tracing::debug!(error = %e, "websocket session ended");
    }
}
