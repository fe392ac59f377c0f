//! Asking an agent's admin API (`/v1/stat`, `/v1/tap`) directly, and the
//! plain-text tables the commands print.
use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::TokioIo;

/// `GET path` on the agent at `addr`: its response when it is 200 (the
/// body still to read: it may stream), else why not. The connection, the
/// request and the head must come within 10 s.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Response<Incoming>, String> {
    let ask = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        send.send_request(req).await.map_err(|e| e.to_string())
    };
    let resp = tokio::time::timeout(Duration::from_secs(10), ask)
        .await
        .map_err(|_| "no answer within 10s".to_owned())??;
    if resp.status() == StatusCode::OK {
        return Ok(resp);
    }
    let status = resp.status();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Err(format!(
        "{status}: {}",
        String::from_utf8_lossy(&body).trim()
    ))
}

/// Rows as columns three spaces apart, each as wide as its widest cell.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_line_up_whatever_the_characters() {
        let t = super::table(&[
            vec!["SRC".into(), "SECURED".into()],
            vec!["web".into(), "√ (node)".into()],
        ]);
        assert_eq!(t, "SRC   SECURED\nweb   √ (node)\n");
    }
}
