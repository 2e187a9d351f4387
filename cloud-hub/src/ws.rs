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
