//! An in-memory connected stream pair, for tests and in-process migration: bounded buffering
//! like a socket, an optional bandwidth limit to model a network link, and a read timeout so a
//! stuck peer fails a test instead of hanging it.

use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::thread;
use std::time::{Duration, Instant};

use super::cut::Shutdown;

/// Largest chunk one write moves through the pipe.
const CHUNK: usize = 64 << 10;

/// Shape of an in-memory pipe.
#[derive(Clone, Debug)]
pub struct MemPipeConfig {
    /// Link bandwidth in bytes per second in each direction; `None` is memory speed.
    pub bandwidth: Option<u64>,
    /// Bytes that may be in flight in each direction before writes block (rounded up to
    /// 64 KiB chunks).
    pub buffer: usize,
    /// How long a read waits for data before failing with `TimedOut`; `None` waits forever.
    pub read_timeout: Option<Duration>,
}

impl Default for MemPipeConfig {
    fn default() -> Self {
        MemPipeConfig {
            bandwidth: None,
            buffer: 2 << 20,
            read_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// One end of an in-memory pipe. Dropping it (or [`Shutdown::shutdown`]) closes both
/// directions: the peer reads end-of-file, and its writes fail with `BrokenPipe`.
#[derive(Debug)]
pub struct MemStream {
    tx: Option<SyncSender<Vec<u8>>>,
    rx: Option<Receiver<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
    bandwidth: Option<u64>,
    next_send: Option<Instant>,
    read_timeout: Option<Duration>,
}

/// Creates a connected pair.
pub fn mem_pipe(config: &MemPipeConfig) -> (MemStream, MemStream) {
    let chunks = config.buffer.div_ceil(CHUNK).max(1);
    let (tx_ab, rx_ab) = sync_channel(chunks);
    let (tx_ba, rx_ba) = sync_channel(chunks);
    let end = |tx, rx| MemStream {
        tx: Some(tx),
        rx: Some(rx),
        cur: Vec::new(),
        pos: 0,
        bandwidth: config.bandwidth.filter(|&b| b > 0),
        next_send: None,
        read_timeout: config.read_timeout,
    };
    (end(tx_ab, rx_ba), end(tx_ba, rx_ab))
}

impl MemStream {
    /// Closes the sending direction only: the peer reads end-of-file after the data already
    /// written, while this end can still read.
    pub fn close_write(&mut self) {
        self.tx = None;
    }

    /// Waits as long as the link needs to carry `n` more bytes.
    fn pace(&mut self, n: usize) {
        let Some(bw) = self.bandwidth else { return };
        let now = Instant::now();
        let start = self.next_send.map_or(now, |t| t.max(now));
        let cost = Duration::from_secs_f64(n as f64 / bw as f64);
        let next = start + cost;
        self.next_send = Some(next);
        if next > now {
            thread::sleep(next - now);
        }
    }
}

impl Read for MemStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.pos == self.cur.len() {
            let Some(rx) = &self.rx else { return Ok(0) };
            let next = match self.read_timeout {
                Some(t) => rx.recv_timeout(t),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match next {
                Ok(chunk) => {
                    self.cur = chunk;
                    self.pos = 0;
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(0),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "in-memory pipe read timed out",
                    ))
                }
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for MemStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let broken = || io::Error::new(io::ErrorKind::BrokenPipe, "in-memory pipe closed");
        if self.tx.is_none() {
            return Err(broken());
        }
        let n = buf.len().min(CHUNK);
        if n == 0 {
            return Ok(0);
        }
        self.pace(n);
        let tx = self.tx.as_ref().ok_or_else(broken)?;
        tx.send(buf[..n].to_vec()).map_err(|_| broken())?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Shutdown for MemStream {
    fn shutdown(&mut self) -> io::Result<()> {
        self.tx = None;
        self.rx = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_mem_pipe_transfers_and_closes() {
        let (mut a, mut b) = mem_pipe(&MemPipeConfig::default());
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let d2 = data.clone();
        let t = thread::spawn(move || {
            a.write_all(&d2).unwrap();
            a
        });
        let mut got = vec![0u8; data.len()];
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, data);
        drop(t.join().unwrap());
        assert_eq!(
            b.read(&mut [0u8; 4]).unwrap(),
            0,
            "EOF after the peer drops"
        );
        assert_eq!(b.write(b"x").unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn test_mem_pipe_bandwidth_limit_paces_writes() {
        let cfg = MemPipeConfig {
            bandwidth: Some(10 << 20),
            ..MemPipeConfig::default()
        };
        let (mut a, mut b) = mem_pipe(&cfg);
        let t = thread::spawn(move || {
            let mut sink = vec![0u8; 1 << 20];
            b.read_exact(&mut sink).unwrap();
        });
        let start = Instant::now();
        a.write_all(&vec![1u8; 1 << 20]).unwrap();
        t.join().unwrap();
        // 1 MiB at 10 MiB/s: at least ~100 ms (sleeps never end early).
        assert!(start.elapsed() >= Duration::from_millis(90));
    }

    #[test]
    fn test_mem_pipe_read_timeout() {
        let cfg = MemPipeConfig {
            read_timeout: Some(Duration::from_millis(20)),
            ..MemPipeConfig::default()
        };
        let (_a, mut b) = mem_pipe(&cfg);
        assert_eq!(
            b.read(&mut [0u8; 1]).unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
    }
}
