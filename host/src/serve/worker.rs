//! A worker thread: one current-thread runtime, one VM, the streams it filters. Everything a VM
//! touches stays on its thread (as in Envoy), so the request path takes no lock.
//!
//! Callbacks run synchronously; what they ask for ([`Effects`]) is carried out afterwards:
//! stream actions resolve the waiting request, call-outs run as local tasks whose answers go
//! back into the VM, and the tick period (re)starts a local timer.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use azgate_wasmhost::{
    Action, Effects, HeaderList, HostError, HttpCall, LocalResponse, Plugin, StreamAction,
    StreamInfo, Vm,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::stats::WorkerStats;
use super::upstream::Clusters;

/// How a paused request ends.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Forward it.
    Continue,
    /// Answer with the filter's response.
    Respond(LocalResponse),
    /// The filter closed the stream.
    Close,
    /// The VM failed: answer 503 (fail closed).
    Failed(HostError),
}

/// The request's outcome now, or later.
pub(crate) enum Pending {
    Ready(Outcome),
    Wait(oneshot::Receiver<Outcome>),
}

pub(crate) struct Worker {
    plugin: Arc<Plugin>,
    vm: RefCell<Vm>,
    /// Bumped whenever the VM is replaced, so answers meant for the old one are dropped.
    generation: Cell<u64>,
    waiters: RefCell<HashMap<u32, oneshot::Sender<Outcome>>>,
    early: RefCell<HashMap<u32, Outcome>>,
    tick: RefCell<Option<JoinHandle<()>>>,
    clusters: Arc<Clusters>,
    pub(crate) stats: Arc<WorkerStats>,
}

impl Worker {
    pub(crate) fn new(
        plugin: Arc<Plugin>,
        vm: Vm,
        clusters: Arc<Clusters>,
        stats: Arc<WorkerStats>,
    ) -> Rc<Self> {
        Rc::new(Self {
            plugin,
            vm: RefCell::new(vm),
            generation: Cell::new(0),
            waiters: RefCell::new(HashMap::new()),
            early: RefCell::new(HashMap::new()),
            tick: RefCell::new(None),
            clusters,
            stats,
        })
    }

    /// Creates the stream and runs `proxy_on_request_headers`.
    pub(crate) fn start_stream(
        self: &Rc<Self>,
        headers: HeaderList,
        info: StreamInfo,
        end_of_stream: bool,
    ) -> Result<(u32, Pending), HostError> {
        let started = Instant::now();
        let result = {
            let mut vm = self.vm.borrow_mut();
            vm.create_stream(headers, info).and_then(|id| {
                let action = vm.on_request_headers(id, end_of_stream)?;
                Ok((id, action, vm.take_effects()))
            })
        };
        self.stats.record_filter_time(started.elapsed());
        let (id, action, effects) = result.inspect_err(|e| self.fail(e))?;
        self.apply(effects);
        if let Some(outcome) = self.early.borrow_mut().remove(&id) {
            return Ok((id, Pending::Ready(outcome)));
        }
        if action == Action::Continue {
            return Ok((id, Pending::Ready(Outcome::Continue)));
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.borrow_mut().insert(id, tx);
        Ok((id, Pending::Wait(rx)))
    }

    /// The request headers as the filter left them.
    pub(crate) fn request_headers(&self, id: u32) -> Option<HeaderList> {
        self.vm
            .borrow()
            .stream(id)
            .map(|s| s.request_headers.clone())
    }

    /// The response headers as the filter left them (after `proxy_on_response_headers`).
    pub(crate) fn response_headers_now(&self, id: u32) -> Option<HeaderList> {
        self.vm
            .borrow()
            .stream(id)
            .map(|s| s.response_headers.clone())
    }

    /// Runs `proxy_on_response_headers`; a local response made there replaces the answer.
    pub(crate) fn response_headers(
        self: &Rc<Self>,
        id: u32,
        headers: HeaderList,
        end_of_stream: bool,
    ) -> Option<LocalResponse> {
        let result = {
            let mut vm = self.vm.borrow_mut();
            vm.on_response_headers(id, headers, end_of_stream)
                .map(|_| vm.take_effects())
        };
        match result {
            Ok(effects) => {
                self.apply(effects);
                match self.early.borrow_mut().remove(&id) {
                    Some(Outcome::Respond(local)) => Some(local),
                    _ => None,
                }
            }
            Err(e) => {
                self.fail(&e);
                None
            }
        }
    }

    /// Ends a stream (`on_log`, `on_done`, `on_delete`).
    pub(crate) fn finish_stream(self: &Rc<Self>, id: u32) {
        self.waiters.borrow_mut().remove(&id);
        self.early.borrow_mut().remove(&id);
        let result = {
            let mut vm = self.vm.borrow_mut();
            vm.finish_stream(id).map(|_| vm.take_effects())
        };
        match result {
            Ok(effects) => self.apply(effects),
            Err(HostError::Failed(_)) => {}
            Err(e) => self.fail(&e),
        }
    }

    /// Carries out what callbacks asked for.
    fn apply(self: &Rc<Self>, effects: Effects) {
        for (id, action) in effects.actions {
            let outcome = match action {
                StreamAction::Continue(0) => Outcome::Continue,
                // Response-side continues need no action: responses are never paused here.
                StreamAction::Continue(_) => continue,
                StreamAction::Close(_) => Outcome::Close,
                StreamAction::LocalResponse(local) => Outcome::Respond(local),
            };
            if let Some(tx) = self.waiters.borrow_mut().remove(&id) {
                let _ = tx.send(outcome);
            } else {
                self.early.borrow_mut().entry(id).or_insert(outcome);
            }
        }
        let generation = self.generation.get();
        for call in effects.calls {
            let worker = self.clone();
            tokio::task::spawn_local(async move { worker.run_call(call, generation).await });
        }
        if let Some(period) = effects.tick_period {
            self.set_tick(period);
        }
        for ready in effects.queue_ready {
            let result = {
                let mut vm = self.vm.borrow_mut();
                if vm.uid() != ready.vm {
                    tracing::debug!(queue = ready.queue, "queue owned by another worker's VM");
                    continue;
                }
                vm.on_queue_ready(ready.queue).map(|_| vm.take_effects())
            };
            self.after_callback(result);
        }
    }

    async fn run_call(self: Rc<Self>, call: HttpCall, generation: u64) {
        let token = call.token;
        let response = self.clusters.call(call).await;
        if generation != self.generation.get() {
            return;
        }
        let result = {
            let mut vm = self.vm.borrow_mut();
            vm.on_http_call_response(token, response)
                .map(|_| vm.take_effects())
        };
        self.after_callback(result);
    }

    fn after_callback(self: &Rc<Self>, result: Result<Effects, HostError>) {
        match result {
            Ok(effects) => self.apply(effects),
            Err(e) => self.fail(&e),
        }
    }

    fn set_tick(self: &Rc<Self>, period: Duration) {
        if let Some(previous) = self.tick.borrow_mut().take() {
            previous.abort();
        }
        if period.is_zero() {
            return;
        }
        let worker = self.clone();
        let handle = tokio::task::spawn_local(async move {
            let mut interval =
                tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let result = {
                    let mut vm = worker.vm.borrow_mut();
                    vm.on_tick().map(|_| vm.take_effects())
                };
                worker.after_callback(result);
            }
        });
        *self.tick.borrow_mut() = Some(handle);
    }

    /// Hands the VM the plugin's current configuration (a policy reload). Its streams carry
    /// on; a VM that refuses keeps its previous configuration (azgate's filter does), a VM that
    /// traps is replaced, and the replacement starts with the current configuration.
    pub(crate) fn reconfigure(self: &Rc<Self>) {
        let result = self.vm.borrow_mut().reconfigure();
        match result {
            Ok(()) => {}
            Err(error @ HostError::Trap(_)) => self.fail(&error),
            Err(error) => {
                tracing::error!(%error, "the filter refused the new policy; its previous one stays");
            }
        }
    }

    /// A callback trapped: fail every paused request closed, log, count, and start a new VM.
    pub(crate) fn fail(self: &Rc<Self>, error: &HostError) {
        if matches!(error, HostError::Failed(_)) {
            return;
        }
        tracing::error!(%error, "filter VM failed; failing its requests closed and starting a new VM");
        self.stats.vm_restart();
        for (_, tx) in self.waiters.borrow_mut().drain() {
            let _ = tx.send(Outcome::Failed(error.clone()));
        }
        self.early.borrow_mut().clear();
        if let Some(tick) = self.tick.borrow_mut().take() {
            tick.abort();
        }
        self.generation.set(self.generation.get() + 1);
        match self.plugin.start_vm() {
            Ok(vm) => *self.vm.borrow_mut() = vm,
            Err(e) => tracing::error!(error = %e, "could not start a replacement VM"),
        }
    }
}
