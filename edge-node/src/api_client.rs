//! A small HTTP/1.1 client of the local API, for the CLI commands (`get`, `put`, `watch`...).
//! Plain HTTP on loopback only, so hyper's connection API is enough: no pool, no TLS.

use anyhow::{Context as _, bail};
use axum::body::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

/// Largest answer read whole.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// Characters escaped in a path segment: all but RFC 3986's unreserved ones.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A document id as one percent-encoded path segment (`sites/berlin` → `sites%2Fberlin`).
pub fn encode_segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// A client of the API at one address.
#[derive(Debug, Clone)]
pub struct ApiClient {
    addr: String,
}

impl ApiClient {
    /// A client of the daemon at `addr` (`host:port`).
    pub fn new(addr: impl Into<String>) -> Self {
        ApiClient { addr: addr.into() }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Response<Incoming>> {
        let stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the edge daemon's API at {}; is `syncline-edge run` running \
                     (give its address with --api or --data)?",
                    self.addr
                )
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("talking to the edge daemon")?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "API connection ended");
            }
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.addr);
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body).context("building the request")?;
        sender
            .send_request(req)
            .await
            .context("sending the request to the edge daemon")
    }

    /// Sends a request and reads its JSON answer; an error answer becomes an error with the
    /// daemon's message.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the daemon answered {status} with a body that is not JSON: {}",
                String::from_utf8_lossy(&bytes)
            )
        })?;
        check(status, &value)?;
        Ok(value)
    }

    /// Follows an event stream, calling `on_event(name, data)` for each event, until the
    /// daemon closes it.
    pub async fn events(
        &self,
        path: &str,
        mut on_event: impl FnMut(&str, &str) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let resp = self.send(Method::GET, path, None).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
                .to_bytes();
            let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            check(status, &value)?;
            bail!("the daemon answered {status}");
        }
        let mut parser = SseParser::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("reading the event stream")?;
            if let Some(chunk) = frame.data_ref() {
                for (name, data) in parser.feed(chunk)? {
                    on_event(&name, &data)?;
                }
            }
        }
        Ok(())
    }
}

fn check(status: StatusCode, value: &Value) -> anyhow::Result<()> {
    if status.is_success() {
        return Ok(());
    }
    let message = value["error"].as_str().unwrap_or("no message");
    let code = value["code"].as_str().unwrap_or("?");
    bail!("{message} ({status}, {code})")
}

/// Splits a Server-Sent Events stream into `(event name, data)` pairs.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    name: String,
    data: Vec<String>,
}

/// Longest line accepted from the daemon.
const MAX_LINE: usize = 16 * 1024 * 1024;

impl SseParser {
    /// Feeds bytes; returns the events they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> anyhow::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                if self.line.len() > MAX_LINE {
                    bail!("an event stream line is over {MAX_LINE} bytes");
                }
                continue;
            }
            let raw = std::mem::take(&mut self.line);
            let line = String::from_utf8_lossy(&raw);
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if line.is_empty() {
                if !self.data.is_empty() {
                    let name = std::mem::take(&mut self.name);
                    let name = if name.is_empty() {
                        "message".into()
                    } else {
                        name
                    };
                    out.push((name, self.data.join("\n")));
                    self.data.clear();
                }
                self.name.clear();
            } else if line.starts_with(':') {
                // A comment (keep-alive).
            } else {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => self.name = value.to_owned(),
                    "data" => self.data.push(value.to_owned()),
                    _ => {}
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("sites/berlin"), "sites%2Fberlin");
        assert_eq!(encode_segment("a-b_c.d~e:f@g"), "a-b_c.d~e%3Af%40g");
    }

    #[test]
    fn the_parser_splits_events_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.feed(b": hello\n\nevent: change\nda").unwrap().is_empty());
        let got = p.feed(b"ta: {\"a\":1}\r\n\r\ndata: x\n\n").unwrap();
        assert_eq!(
            got,
            vec![
                ("change".to_owned(), "{\"a\":1}".to_owned()),
                ("message".to_owned(), "x".to_owned())
            ]
        );
    }
}
