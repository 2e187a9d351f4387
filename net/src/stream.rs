//! One session's QUIC stream, for both sides: frames out of a channel onto the stream, and
//! frames off the stream into the owning thread's command channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use syncline_core::error::WireError;
use syncline_core::wire::{FrameDecoder, Message};
use tokio::sync::mpsc;

use crate::NetError;

/// Bytes moved by a driver's sessions, for metrics.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Bytes read from peers.
    pub bytes_in: AtomicU64,
    /// Bytes written to peers.
    pub bytes_out: AtomicU64,
}

/// Bytes read from the stream at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Runs the stream until either direction ends. Outgoing messages come from `outbound`;
/// `writable()` is sent to the owner whenever `outbound` has been drained, so the owner pumps
/// more (it stops pumping while the channel is full). Each decoded message goes to the owner
/// as what `message(m)` resolves to (in order: the next message is read after it); undecodable
/// bytes are reported as `wire_error(e)` and end the stream.
#[allow(clippy::too_many_arguments)] // Two call sites; each argument is named there.
pub(crate) async fn run<C: Send, M: Future<Output = C>>(
    traffic: Arc<Traffic>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut outbound: mpsc::Receiver<Message>,
    owner: mpsc::Sender<C>,
    message: impl Fn(Message) -> M,
    writable: impl Fn() -> C,
    wire_error: impl Fn(WireError) -> Option<C>,
) -> Result<(), NetError> {
    let writer_owner = owner.clone();
    let writer_traffic = traffic.clone();
    let writer = async move {
        while let Some(m) = outbound.recv().await {
            let frame = m.to_frame();
            send.write_all(&frame).await?;
            writer_traffic
                .bytes_out
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
            if outbound.is_empty() && writer_owner.send(writable()).await.is_err() {
                break;
            }
        }
        // The owner closed the session: end the stream after what was queued.
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        Ok::<(), NetError>(())
    };
    let reader = async move {
        let mut decoder = FrameDecoder::new();
        loop {
            match recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => {
                    traffic
                        .bytes_in
                        .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                    decoder.extend(&chunk.bytes);
                }
                None => return decoder.finish().map_err(NetError::from),
            }
            loop {
                match decoder.next_message() {
                    Ok(Some(m)) => owner
                        .send(message(m).await)
                        .await
                        .map_err(|_| NetError::Stopped)?,
                    Ok(None) => break,
                    Err(e) => {
                        if let Some(c) = wire_error(e.clone()) {
                            let _ = owner.send(c).await;
                        }
                        return Err(e.into());
                    }
                }
            }
        }
    };
    until_either(reader, writer).await
}

/// Runs a session's reader and writer until either ends. When the reader ends on refused
/// bytes, the owner's `Error` is on its way out (the owner ends the session after it): the
/// writer gets up to 2 s to send it before the connection closes, or the peer would never
/// learn why.
pub(crate) async fn until_either(
    reader: impl Future<Output = Result<(), NetError>>,
    writer: impl Future<Output = Result<(), NetError>>,
) -> Result<(), NetError> {
    tokio::pin!(reader, writer);
    tokio::select! {
        r = &mut reader => match r {
            Err(e @ NetError::Wire(_)) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
                Err(e)
            }
            r => r,
        },
        r = &mut writer => r,
    }
}
