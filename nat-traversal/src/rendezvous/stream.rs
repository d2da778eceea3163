//! Reading and writing frames on the QUIC control stream.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::proto::{FrameDecoder, encode_frame};

/// Why no message could be read.
#[derive(Debug)]
pub(crate) enum ReadFailure {
    /// The stream or connection is gone (the reason, for logs).
    Closed(String),
    /// The peer sent something that is not a valid frame.
    Protocol(String),
}

/// Reads the next message; `Ok(None)` when the peer finished the stream.
/// Cancel-safe: bytes already read stay in `decoder`.
pub(crate) async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<Option<T>, ReadFailure> {
    loop {
        match decoder.next::<T>() {
            Ok(Some(m)) => return Ok(Some(m)),
            Ok(None) => {}
            Err(e) => return Err(ReadFailure::Protocol(e.to_string())),
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes),
            Ok(None) => return Ok(None),
            Err(e) => return Err(ReadFailure::Closed(e.to_string())),
        }
    }
}

/// Writes one message.
pub(crate) async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    message: &T,
) -> Result<(), String> {
    send.write_all(&encode_frame(message))
        .await
        .map_err(|e| e.to_string())
}
