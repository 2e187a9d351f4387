//! A fault-injecting UDP proxy for the nemesis suite: it stands between one edge and the hub
//! on 127.0.0.1 and forwards the QUIC datagrams of each direction through a fault model set at
//! run time: loss, delay with jitter, duplication, reordering, and a full partition. Every
//! random choice comes from a seeded generator, so a schedule of faults replays alike (the
//! timing of real processes does not).
//!
//! Threads, not a runtime: one reads the edge side, one per client address reads the hub side,
//! and one sends the datagrams whose delay is over, in deadline order.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What happens to the datagrams of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Every datagram is dropped.
    pub partitioned: bool,
    /// Chance that a datagram is dropped.
    pub loss: f64,
    /// Chance that a datagram is sent twice.
    pub duplicate: f64,
    /// Chance that a datagram is held back behind later ones.
    pub reorder: f64,
    /// Delay added to every datagram.
    pub delay: Duration,
    /// Up to this much more delay, uniformly at random.
    pub jitter: Duration,
}

impl Faults {
    /// A clean link.
    pub const NONE: Faults = Faults {
        partitioned: false,
        loss: 0.0,
        duplicate: 0.0,
        reorder: 0.0,
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
    };

    /// A full partition.
    pub const PARTITION: Faults = Faults {
        partitioned: true,
        ..Faults::NONE
    };
}

/// Datagrams handled by a proxy so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Forwarded (duplicates counted once more).
    pub forwarded: u64,
    /// Dropped by loss or a partition.
    pub dropped: u64,
    /// Sent twice.
    pub duplicated: u64,
    /// Held back behind later datagrams.
    pub reordered: u64,
}

/// Which way a datagram goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Edge to hub.
    Up,
    /// Hub to edge.
    Down,
}

struct Pending {
    at: Instant,
    seq: u64,
    socket: Arc<UdpSocket>,
    to: Option<SocketAddr>,
    bytes: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Shared {
    faults: Mutex<[Faults; 2]>,
    rng: Mutex<StdRng>,
    queue: Mutex<BinaryHeap<Reverse<Pending>>>,
    wake: Condvar,
    stop: AtomicBool,
    seq: AtomicU64,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
}

impl Shared {
    /// Applies the fault model of `dir` to one datagram: drops it, or queues it (once or
    /// twice) for its delivery time.
    fn route(&self, dir: Dir, socket: &Arc<UdpSocket>, to: Option<SocketAddr>, bytes: &[u8]) {
        let f = self
            .faults
            .lock()
            .map(|f| f[dir as usize])
            .unwrap_or_default();
        let (drop, copies, delays) = {
            let Ok(mut rng) = self.rng.lock() else { return };
            let drop = f.partitioned || (f.loss > 0.0 && rng.gen_bool(f.loss.min(1.0)));
            let copies = if f.duplicate > 0.0 && rng.gen_bool(f.duplicate.min(1.0)) {
                2
            } else {
                1
            };
            let mut delays = [Duration::ZERO; 2];
            for d in delays.iter_mut().take(copies) {
                let jitter = if f.jitter.is_zero() {
                    Duration::ZERO
                } else {
                    f.jitter.mul_f64(rng.r#gen::<f64>())
                };
                *d = f.delay + jitter;
                if f.reorder > 0.0 && rng.gen_bool(f.reorder.min(1.0)) {
                    // Held back long enough for the next datagrams to pass it.
                    *d += Duration::from_millis(rng.gen_range(5..40));
                    self.reordered.fetch_add(1, Ordering::Relaxed);
                }
            }
            (drop, copies, delays)
        };
        if drop {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if copies == 2 {
            self.duplicated.fetch_add(1, Ordering::Relaxed);
        }
        for delay in delays.iter().take(copies) {
            self.forwarded.fetch_add(1, Ordering::Relaxed);
            if delay.is_zero() {
                send(socket, to, bytes);
                continue;
            }
            let p = Pending {
                at: Instant::now() + *delay,
                seq: self.seq.fetch_add(1, Ordering::Relaxed),
                socket: socket.clone(),
                to,
                bytes: bytes.to_vec(),
            };
            if let Ok(mut q) = self.queue.lock() {
                q.push(Reverse(p));
                self.wake.notify_one();
            }
        }
    }
}

fn send(socket: &UdpSocket, to: Option<SocketAddr>, bytes: &[u8]) {
    // A hub that is down answers with ICMP port unreachable; datagrams are lost then, as on
    // a real network.
    let _ = match to {
        Some(addr) => socket.send_to(bytes, addr),
        None => socket.send(bytes),
    };
}

/// A running proxy; it stops when dropped.
pub struct FaultProxy {
    /// The address the edge is given as its hub.
    pub addr: String,
    shared: Arc<Shared>,
}

const POLL: Duration = Duration::from_millis(50);

impl FaultProxy {
    /// Starts a proxy on a free port of 127.0.0.1 that forwards to `hub` (`IP:PORT`).
    pub fn start(hub: &str, seed: u64) -> std::io::Result<FaultProxy> {
        let hub: SocketAddr = hub
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0")?);
        front.set_read_timeout(Some(POLL))?;
        let addr = front.local_addr()?.to_string();
        let shared = Arc::new(Shared {
            faults: Mutex::new([Faults::NONE; 2]),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            queue: Mutex::new(BinaryHeap::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            reordered: AtomicU64::new(0),
        });
        let s = shared.clone();
        std::thread::spawn(move || deliver(&s));
        let s = shared.clone();
        std::thread::spawn(move || read_front(&s, &front, hub));
        Ok(FaultProxy { addr, shared })
    }

    /// Sets the faults of one direction.
    pub fn set(&self, dir: Dir, faults: Faults) {
        if let Ok(mut f) = self.shared.faults.lock() {
            f[dir as usize] = faults;
        }
    }

    /// Sets the faults of both directions.
    pub fn set_both(&self, faults: Faults) {
        self.set(Dir::Up, faults);
        self.set(Dir::Down, faults);
    }

    /// Heals the link.
    pub fn heal(&self) {
        self.set_both(Faults::NONE);
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> ProxyStats {
        let s = &self.shared;
        ProxyStats {
            forwarded: s.forwarded.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            duplicated: s.duplicated.load(Ordering::Relaxed),
            reordered: s.reordered.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
    }
}

/// Edge to hub: each client address gets an upstream socket of its own (the hub sees one
/// address per edge connection, as without the proxy), and a thread that reads its answers.
fn read_front(shared: &Arc<Shared>, front: &Arc<UdpSocket>, hub: SocketAddr) {
    let mut upstream: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    while !shared.stop.load(Ordering::Relaxed) {
        let Ok((n, client)) = front.recv_from(&mut buf) else {
            continue;
        };
        let up = match upstream.get(&client) {
            Some(u) => u.clone(),
            None => {
                let Ok(u) = UdpSocket::bind("127.0.0.1:0") else {
                    continue;
                };
                if u.connect(hub).is_err() || u.set_read_timeout(Some(POLL)).is_err() {
                    continue;
                }
                let u = Arc::new(u);
                upstream.insert(client, u.clone());
                let (s, f, r) = (shared.clone(), front.clone(), u.clone());
                std::thread::spawn(move || read_back(&s, &r, &f, client));
                u
            }
        };
        shared.route(Dir::Up, &up, None, &buf[..n]);
    }
}

/// Hub to edge, for one client.
fn read_back(shared: &Shared, up: &UdpSocket, front: &Arc<UdpSocket>, client: SocketAddr) {
    let mut buf = vec![0u8; 65536];
    while !shared.stop.load(Ordering::Relaxed) {
        // Errors are timeouts, or ICMP unreachable while the hub is down: keep reading.
        if let Ok(n) = up.recv(&mut buf) {
            shared.route(Dir::Down, front, Some(client), &buf[..n]);
        }
    }
}

/// Sends queued datagrams when their time comes.
fn deliver(shared: &Shared) {
    let Ok(mut q) = shared.queue.lock() else {
        return;
    };
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = match q.peek() {
            Some(Reverse(p)) if p.at <= now => {
                if let Some(Reverse(p)) = q.pop() {
                    send(&p.socket, p.to, &p.bytes);
                }
                continue;
            }
            Some(Reverse(p)) => p.at - now,
            None => POLL,
        };
        q = match shared.wake.wait_timeout(q, wait) {
            Ok((q, _)) => q,
            Err(_) => return,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> (String, std::thread::JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let addr = s.local_addr().unwrap().to_string();
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                if &buf[..n] == b"quit" {
                    break;
                }
                let _ = s.send_to(&buf[..n], from);
            }
        });
        (addr, t)
    }

    fn client(proxy: &FaultProxy) -> UdpSocket {
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.connect(&proxy.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        c
    }

    /// Sends `n` numbered datagrams and returns the numbers echoed back, in arrival order.
    fn round_trip(c: &UdpSocket, n: u32) -> Vec<u32> {
        for i in 0..n {
            c.send(&i.to_be_bytes()).unwrap();
            if i % 16 == 15 {
                // Paced, so that no socket buffer on the way overflows.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while let Ok(len) = c.recv(&mut buf) {
            if len == 4 {
                got.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
            }
        }
        got
    }

    #[test]
    fn a_clean_link_forwards_both_ways_in_order() {
        let (hub, t) = echo_server();
        let proxy = FaultProxy::start(&hub, 1).unwrap();
        let c = client(&proxy);
        assert_eq!(round_trip(&c, 50), (0..50).collect::<Vec<_>>());
        c.send(b"quit").unwrap();
        t.join().unwrap();
    }

    #[test]
    fn a_partition_drops_everything_until_it_heals() {
        let (hub, t) = echo_server();
        let proxy = FaultProxy::start(&hub, 2).unwrap();
        let c = client(&proxy);
        proxy.set(Dir::Down, Faults::PARTITION);
        assert_eq!(round_trip(&c, 10), Vec::<u32>::new());
        assert_eq!(proxy.stats().dropped, 10);
        proxy.heal();
        assert_eq!(round_trip(&c, 10), (0..10).collect::<Vec<_>>());
        c.send(b"quit").unwrap();
        t.join().unwrap();
    }

    #[test]
    fn loss_duplication_and_reordering_happen_at_about_their_rates() {
        let (hub, t) = echo_server();
        let proxy = FaultProxy::start(&hub, 3).unwrap();
        let c = client(&proxy);
        proxy.set(
            Dir::Up,
            Faults {
                loss: 0.2,
                duplicate: 0.2,
                reorder: 0.2,
                delay: Duration::from_millis(1),
                jitter: Duration::from_millis(2),
                ..Faults::NONE
            },
        );
        let got = round_trip(&c, 1000);
        let s = proxy.stats();
        assert!((120..280).contains(&s.dropped), "{s:?}");
        assert!((100..260).contains(&s.duplicated), "{s:?}");
        assert!(s.reordered > 50, "{s:?}");
        assert!(
            got.windows(2).any(|w| w[0] > w[1]),
            "nothing arrived out of order"
        );
        let mut unique = got.clone();
        unique.sort_unstable();
        unique.dedup();
        assert!(got.len() > unique.len(), "nothing arrived twice");
        proxy.heal();
        c.send(b"quit").unwrap();
        t.join().unwrap();
    }
}
