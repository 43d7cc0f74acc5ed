//! State shared by every VM of a plugin: shared data (key-value with compare-and-swap), shared
//! queues and metrics. One instance per gateway process, like Envoy's per-`vm_id` stores.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Mutex, RwLock};

/// Shared data with Envoy's semantics: every write gets a new non-zero cas; a non-zero cas only
/// guards a key that exists; a missing key is NOT_FOUND.
#[derive(Debug, Default)]
pub struct SharedData {
    entries: RwLock<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: AtomicU32,
}

/// Outcome of a shared-data write.
#[derive(Debug, PartialEq, Eq)]
pub enum SetOutcome {
    /// Written.
    Written,
    /// The key exists with another cas.
    CasMismatch,
}

impl SharedData {
    /// The value and cas of `key`.
    pub fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.entries.read().ok()?.get(key).cloned()
    }

    /// Writes `value` if `cas` is 0 or matches.
    pub fn set(&self, key: &str, value: &[u8], cas: u32) -> SetOutcome {
        let Ok(mut entries) = self.entries.write() else {
            return SetOutcome::CasMismatch;
        };
        if cas != 0
            && let Some((_, current)) = entries.get(key)
            && *current != cas
        {
            return SetOutcome::CasMismatch;
        }
        let mut next = self
            .next_cas
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        if next == 0 {
            next = self
                .next_cas
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
        }
        entries.insert(key.to_string(), (value.to_vec(), next));
        SetOutcome::Written
    }
}

/// Shared queues: registered by name by one VM, resolved and written by any.
#[derive(Debug, Default)]
pub struct SharedQueues {
    inner: Mutex<Queues>,
}

#[derive(Debug, Default)]
struct Queues {
    by_name: HashMap<(String, String), u32>,
    queues: HashMap<u32, Queue>,
    next_id: u32,
}

#[derive(Debug)]
struct Queue {
    /// The VM (worker) that registered it and gets `on_queue_ready`.
    owner: u64,
    owner_root: u32,
    items: VecDeque<Vec<u8>>,
}

/// Who must be told that a queue has data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueReady {
    /// The owning VM.
    pub vm: u64,
    /// Its root context.
    pub root_context: u32,
    /// The queue.
    pub queue: u32,
}

impl SharedQueues {
    /// Registers (or re-registers) `name` for `vm_id`, owned by `vm`.
    pub fn register(&self, vm_id: &str, name: &str, vm: u64, root: u32) -> u32 {
        let Ok(mut q) = self.inner.lock() else {
            return 0;
        };
        let key = (vm_id.to_string(), name.to_string());
        if let Some(id) = q.by_name.get(&key).copied() {
            if let Some(queue) = q.queues.get_mut(&id) {
                queue.owner = vm;
                queue.owner_root = root;
            }
            return id;
        }
        q.next_id += 1;
        let id = q.next_id;
        q.by_name.insert(key, id);
        q.queues.insert(
            id,
            Queue {
                owner: vm,
                owner_root: root,
                items: VecDeque::new(),
            },
        );
        id
    }

    /// The id of `name`, if registered.
    pub fn resolve(&self, vm_id: &str, name: &str) -> Option<u32> {
        let q = self.inner.lock().ok()?;
        q.by_name
            .get(&(vm_id.to_string(), name.to_string()))
            .copied()
    }

    /// Appends to queue `id`; returns whom to notify, or `None` if the queue is unknown.
    pub fn enqueue(&self, id: u32, value: &[u8]) -> Option<QueueReady> {
        let mut q = self.inner.lock().ok()?;
        let queue = q.queues.get_mut(&id)?;
        queue.items.push_back(value.to_vec());
        Some(QueueReady {
            vm: queue.owner,
            root_context: queue.owner_root,
            queue: id,
        })
    }

    /// Takes the oldest item: `None` for an unknown queue, `Some(None)` if empty.
    pub fn dequeue(&self, id: u32) -> Option<Option<Vec<u8>>> {
        let mut q = self.inner.lock().ok()?;
        let queue = q.queues.get_mut(&id)?;
        Some(queue.items.pop_front())
    }
}

/// Metric kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Only increases.
    Counter,
    /// Set or moved.
    Gauge,
    /// Recorded values (this host keeps their sum and count).
    Histogram,
}

/// A metric as exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricSample {
    /// Name given by the filter.
    pub name: String,
    /// Kind.
    pub kind: MetricKind,
    /// Counter or gauge value; histogram sum.
    pub value: i64,
    /// Histogram count (0 otherwise).
    pub count: i64,
}

#[derive(Debug)]
struct Metric {
    name: String,
    kind: MetricKind,
    value: AtomicI64,
    count: AtomicI64,
}

/// Why a metric call was refused (Envoy's statuses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricError {
    /// The id names no defined metric of the kind its low bits say.
    NotFound,
    /// The call does not apply to that kind (reading or incrementing a histogram, a counter
    /// going down), or the id's kind bits name no kind.
    BadArgument,
}

/// Metrics defined by filters: one per (kind, name) across all VMs, as Envoy's stats are.
///
/// Ids follow Envoy: the low two bits are the kind (counter 0, gauge 1, histogram 2) and every
/// definition gets a new id, also for a name already defined (both ids then name the same
/// metric). Calls on an id check its kind bits first, as Envoy does, so an unknown id can be
/// `NotFound` or `BadArgument` depending on those bits.
#[derive(Debug, Default)]
pub struct Metrics {
    metrics: RwLock<Vec<Metric>>,
    /// Id → index in `metrics`.
    ids: RwLock<HashMap<u32, usize>>,
    next_id: AtomicU32,
}

/// The id bits that hold the kind.
const METRIC_KIND_MASK: u32 = 0x3;

impl MetricKind {
    fn bits(self) -> u32 {
        match self {
            MetricKind::Counter => 0,
            MetricKind::Gauge => 1,
            MetricKind::Histogram => 2,
        }
    }

    fn from_id(id: u32) -> Option<Self> {
        match id & METRIC_KIND_MASK {
            0 => Some(MetricKind::Counter),
            1 => Some(MetricKind::Gauge),
            2 => Some(MetricKind::Histogram),
            _ => None,
        }
    }
}

impl Metrics {
    /// Defines a metric, or a new id for one already defined with that kind and name; ids are
    /// never 0.
    pub fn define(&self, kind: MetricKind, name: &str) -> u32 {
        let (Ok(mut metrics), Ok(mut ids)) = (self.metrics.write(), self.ids.write()) else {
            return 0;
        };
        let index = match metrics
            .iter()
            .position(|m| m.kind == kind && m.name == name)
        {
            Some(index) => index,
            None => {
                metrics.push(Metric {
                    name: name.to_string(),
                    kind,
                    value: AtomicI64::new(0),
                    count: AtomicI64::new(0),
                });
                metrics.len() - 1
            }
        };
        let serial = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let id = (serial << 2) | kind.bits();
        ids.insert(id, index);
        id
    }

    /// Runs `f` on the metric `id` names, if its kind bits say `kind`.
    fn with<T>(&self, id: u32, f: impl FnOnce(&Metric) -> T) -> Option<T> {
        let index = *self.ids.read().ok()?.get(&id)?;
        let metrics = self.metrics.read().ok()?;
        metrics.get(index).map(f)
    }

    /// Adds `delta` to a counter (only upwards) or a gauge.
    pub fn increment(&self, id: u32, delta: i64) -> Result<(), MetricError> {
        match MetricKind::from_id(id) {
            Some(MetricKind::Counter) => {
                let known = self.with(id, |m| {
                    if delta > 0 {
                        m.value.fetch_add(delta, Ordering::Relaxed);
                        true
                    } else {
                        false
                    }
                });
                match known {
                    Some(true) => Ok(()),
                    Some(false) => Err(MetricError::BadArgument),
                    None => Err(MetricError::NotFound),
                }
            }
            Some(MetricKind::Gauge) => self
                .with(id, |m| m.value.fetch_add(delta, Ordering::Relaxed))
                .map(drop)
                .ok_or(MetricError::NotFound),
            Some(MetricKind::Histogram) | None => Err(MetricError::BadArgument),
        }
    }

    /// Records `value`: added to a counter, set on a gauge, recorded by a histogram.
    pub fn record(&self, id: u32, value: i64) -> Result<(), MetricError> {
        if MetricKind::from_id(id).is_none() {
            return Err(MetricError::NotFound);
        }
        self.with(id, |m| match m.kind {
            MetricKind::Counter => {
                m.value.fetch_add(value, Ordering::Relaxed);
            }
            MetricKind::Gauge => m.value.store(value, Ordering::Relaxed),
            MetricKind::Histogram => {
                m.value.fetch_add(value, Ordering::Relaxed);
                m.count.fetch_add(1, Ordering::Relaxed);
            }
        })
        .ok_or(MetricError::NotFound)
    }

    /// A counter's or gauge's value; histograms cannot be read.
    pub fn value(&self, id: u32) -> Result<i64, MetricError> {
        match MetricKind::from_id(id) {
            Some(MetricKind::Counter | MetricKind::Gauge) => self
                .with(id, |m| m.value.load(Ordering::Relaxed))
                .ok_or(MetricError::NotFound),
            Some(MetricKind::Histogram) | None => Err(MetricError::BadArgument),
        }
    }

    /// Everything, for `/metrics`.
    pub fn samples(&self) -> Vec<MetricSample> {
        self.metrics
            .read()
            .map(|metrics| {
                metrics
                    .iter()
                    .map(|m| MetricSample {
                        name: m.name.clone(),
                        kind: m.kind,
                        value: m.value.load(Ordering::Relaxed),
                        count: m.count.load(Ordering::Relaxed),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_data_cas_follows_envoy() {
        let data = SharedData::default();
        assert!(data.get("k").is_none());
        // A cas on a missing key does not guard it (Envoy behaviour).
        assert_eq!(data.set("k", b"1", 77), SetOutcome::Written);
        let (_, cas) = data.get("k").unwrap();
        assert_ne!(cas, 0);
        assert_eq!(data.set("k", b"2", cas + 1), SetOutcome::CasMismatch);
        assert_eq!(data.set("k", b"2", cas), SetOutcome::Written);
        let (value, cas2) = data.get("k").unwrap();
        assert_eq!(value, b"2");
        assert_ne!(cas, cas2);
        assert_eq!(data.set("k", b"3", 0), SetOutcome::Written);
    }

    #[test]
    fn queues_notify_their_owner() {
        let queues = SharedQueues::default();
        let id = queues.register("vm", "q", 7, 1);
        assert_eq!(queues.resolve("vm", "q"), Some(id));
        assert_eq!(queues.resolve("other", "q"), None);
        assert_eq!(queues.dequeue(id), Some(None));
        let ready = queues.enqueue(id, b"x").unwrap();
        assert_eq!((ready.vm, ready.root_context, ready.queue), (7, 1, id));
        assert_eq!(queues.dequeue(id), Some(Some(b"x".to_vec())));
        assert!(queues.enqueue(id + 1, b"x").is_none());
    }

    #[test]
    fn metrics_follow_envoy() {
        let metrics = Metrics::default();
        let a = metrics.define(MetricKind::Counter, "requests");
        let again = metrics.define(MetricKind::Counter, "requests");
        // A new id for the same counter.
        assert_ne!(again, a);
        assert_eq!(metrics.increment(a, 2), Ok(()));
        assert_eq!(metrics.value(again), Ok(2));
        assert_eq!(metrics.increment(a, -1), Err(MetricError::BadArgument));
        // Recording on a counter adds.
        assert_eq!(metrics.record(a, 10), Ok(()));
        assert_eq!(metrics.value(a), Ok(12));
        let g = metrics.define(MetricKind::Gauge, "open");
        assert_eq!(metrics.record(g, 5), Ok(()));
        assert_eq!(metrics.increment(g, -2), Ok(()));
        assert_eq!(metrics.value(g), Ok(3));
        let h = metrics.define(MetricKind::Histogram, "latency");
        assert_eq!(metrics.record(h, 5), Ok(()));
        assert_eq!(metrics.record(h, 7), Ok(()));
        assert_eq!(metrics.value(h), Err(MetricError::BadArgument));
        assert_eq!(metrics.increment(h, 1), Err(MetricError::BadArgument));
        let sample = metrics
            .samples()
            .into_iter()
            .find(|s| s.name == "latency")
            .unwrap();
        assert_eq!((sample.value, sample.count), (12, 2));
        // Unknown ids: the kind bits decide, as in Envoy.
        assert_eq!(metrics.increment(400, 1), Err(MetricError::NotFound));
        assert_eq!(metrics.value(401), Err(MetricError::NotFound));
        assert_eq!(metrics.value(402), Err(MetricError::BadArgument));
        assert_eq!(metrics.record(402, 1), Err(MetricError::NotFound));
        assert_eq!(metrics.increment(403, 1), Err(MetricError::BadArgument));
    }
}
