//! A plugin (one compiled module, one `Linker`, shared by every worker) and its VMs (one
//! `Store` and instance per worker thread, as Envoy runs one VM per worker).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use wasmtime::{Config, Engine, Instance, Linker, Module, Store, TypedFunc};

use crate::abi::Action;
use crate::error::HostError;
use crate::shared::{Metrics, SharedData, SharedQueues};
use crate::state::{
    CallResponse, Effects, HeaderList, HostState, Phase, PluginShared, Stream, StreamAction,
    StreamInfo,
};

/// Plugin settings (Envoy's `PluginConfig` and `VmConfig`).
#[derive(Clone, Debug)]
pub struct PluginOptions {
    /// `plugin_name`.
    pub name: String,
    /// `plugin_root_id`.
    pub root_id: String,
    /// `vm_id`: the namespace of shared data and queues.
    pub vm_id: String,
    /// Plugin configuration bytes (buffer 7 during `proxy_on_configure`).
    pub plugin_config: Vec<u8>,
    /// VM configuration bytes (buffer 6 during `proxy_on_vm_start`).
    pub vm_config: Vec<u8>,
    /// Clusters `proxy_http_call` may name.
    pub clusters: Vec<String>,
    /// Level returned by `proxy_get_log_level` (0 trace .. 5 critical).
    pub log_level: u32,
    /// Where compiled code is cached across restarts; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
}

/// Stores shared by every VM of the process.
#[derive(Clone, Debug, Default)]
pub struct SharedStores {
    /// Shared data.
    pub data: Arc<SharedData>,
    /// Shared queues.
    pub queues: Arc<SharedQueues>,
    /// Filter-defined metrics.
    pub metrics: Arc<Metrics>,
}

/// A compiled filter, ready to start VMs. Cheap to share between threads.
pub struct Plugin {
    engine: Engine,
    module: Module,
    linker: Linker<HostState>,
    shared: Arc<PluginShared>,
}

static NEXT_VM: AtomicU64 = AtomicU64::new(1);

/// Compiles `wasm` (or loads it from the cache at `cache_dir`) with the one engine
/// configuration: [`Plugin::load`] and [`Plugin::compile_into_cache`] must agree on it, since
/// the cache keys compiled code by it.
fn compile(wasm: &[u8], cache_dir: Option<&Path>) -> Result<(Engine, Module), HostError> {
    let mut config = Config::new();
    if let Some(dir) = cache_dir {
        let mut cache = wasmtime::CacheConfig::new();
        cache.with_directory(dir);
        let cache = wasmtime::Cache::new(cache).map_err(|e| HostError::Compile(e.to_string()))?;
        config.cache(Some(cache));
    }
    if std::env::var_os("AZGATE_WASM_PERFMAP").is_some() {
        // `perf` can then name the filter's functions (/tmp/perf-<pid>.map).
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let engine = Engine::new(&config).map_err(|e| HostError::Compile(e.to_string()))?;
    let module = Module::new(&engine, wasm).map_err(|e| HostError::Compile(format!("{e:#}")))?;
    Ok((engine, module))
}

/// The root context id every VM uses (Envoy also gives each VM's root context its own id).
const ROOT_CONTEXT: u32 = 1;

impl Plugin {
    /// Compiles `wasm` (or loads it from the cache) and links the host functions.
    pub fn load(
        wasm: &[u8],
        options: PluginOptions,
        stores: SharedStores,
    ) -> Result<Self, HostError> {
        let (engine, module) = compile(wasm, options.cache_dir.as_deref())?;
        let abi_marker = module.exports().any(|e| {
            matches!(
                e.name(),
                "proxy_abi_version_0_2_1" | "proxy_abi_version_0_2_0"
            )
        });
        if !abi_marker {
            return Err(HostError::UnsupportedAbi);
        }
        let mut linker = Linker::new(&engine);
        crate::imports::add_to_linker(&mut linker)
            .map_err(|e| HostError::Compile(e.to_string()))?;
        // Imports this host does not provide trap when called rather than failing the load,
        // so a module that merely links them still runs.
        linker
            .define_unknown_imports_as_traps(&module)
            .map_err(|e| HostError::Compile(e.to_string()))?;
        Ok(Self {
            engine,
            module,
            linker,
            shared: Arc::new(PluginShared {
                name: options.name,
                root_id: options.root_id,
                vm_id: options.vm_id,
                plugin_config: Mutex::new(Arc::new(options.plugin_config)),
                vm_config: options.vm_config,
                clusters: options.clusters.into_iter().collect(),
                log_level: options.log_level,
                shared_data: stores.data,
                queues: stores.queues,
                metrics: stores.metrics,
            }),
        })
    }

    /// Compiles `wasm` into the compiled-code cache at `cache_dir` and nothing else, so that a
    /// later [`Plugin::load`] with that `cache_dir` finds the code there and does not compile.
    /// Meant for a short-lived process: glibc keeps the compiler's freed memory in its arenas
    /// (tens of MB for the azgate filter), and a long-running host that never compiles never
    /// holds it.
    pub fn compile_into_cache(wasm: &[u8], cache_dir: &Path) -> Result<(), HostError> {
        compile(wasm, Some(cache_dir)).map(drop)
    }

    /// Starts a VM: instantiate, `_initialize` (or `_start`), root context, `proxy_on_vm_start`,
    /// `proxy_on_configure`. A `false` from either is an error naming it.
    pub fn start_vm(&self) -> Result<Vm, HostError> {
        let uid = NEXT_VM.fetch_add(1, Ordering::Relaxed);
        let mut store = Store::new(
            &self.engine,
            HostState::new(self.shared.clone(), uid, ROOT_CONTEXT),
        );
        let instance = self
            .linker
            .instantiate(&mut store, &self.module)
            .map_err(|e| HostError::Instantiate(format!("{e:#}")))?;
        let memory = instance.get_memory(&mut store, "memory");
        // Envoy looks up `malloc` first, then `proxy_on_memory_allocate`.
        let allocate = instance
            .get_typed_func::<i32, i32>(&mut store, "malloc")
            .or_else(|_| {
                instance.get_typed_func::<i32, i32>(&mut store, "proxy_on_memory_allocate")
            })
            .map_err(|_| HostError::Instantiate("the module exports no allocator".into()))?;
        store.data_mut().memory = memory;
        store.data_mut().allocate = Some(allocate);
        let callbacks = Callbacks::find(&instance, &mut store);
        let mut vm = Vm {
            store,
            callbacks,
            next_context: ROOT_CONTEXT + 1,
            failed: None,
        };
        vm.initialize(&instance)?;
        Ok(vm)
    }

    /// Replaces the plugin configuration: VMs started from now on get it, and
    /// [`Vm::reconfigure`] hands it to a running VM (`proxy_on_configure` again).
    pub fn set_plugin_config(&self, config: Vec<u8>) {
        *self.shared.current_config_slot() = Arc::new(config);
    }

    /// The shared data store (for tests and metrics).
    pub fn shared_data(&self) -> &SharedData {
        &self.shared.shared_data
    }
}

/// `proxy_on_http_call_response(root, token, headers, body_size, trailers)`.
type CallResponseFunc = TypedFunc<(i32, i32, i32, i32, i32), ()>;

/// The module's callbacks; missing ones are skipped (their default is "continue").
struct Callbacks {
    context_create: Option<TypedFunc<(i32, i32), ()>>,
    vm_start: Option<TypedFunc<(i32, i32), i32>>,
    configure: Option<TypedFunc<(i32, i32), i32>>,
    request_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    response_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    http_call_response: Option<CallResponseFunc>,
    tick: Option<TypedFunc<i32, ()>>,
    queue_ready: Option<TypedFunc<(i32, i32), ()>>,
    done: Option<TypedFunc<i32, i32>>,
    log: Option<TypedFunc<i32, ()>>,
    delete: Option<TypedFunc<i32, ()>>,
}

impl Callbacks {
    fn find(instance: &Instance, store: &mut Store<HostState>) -> Self {
        Self {
            context_create: instance
                .get_typed_func(&mut *store, "proxy_on_context_create")
                .ok(),
            vm_start: instance
                .get_typed_func(&mut *store, "proxy_on_vm_start")
                .ok(),
            configure: instance
                .get_typed_func(&mut *store, "proxy_on_configure")
                .ok(),
            request_headers: instance
                .get_typed_func(&mut *store, "proxy_on_request_headers")
                .ok(),
            response_headers: instance
                .get_typed_func(&mut *store, "proxy_on_response_headers")
                .ok(),
            http_call_response: instance
                .get_typed_func(&mut *store, "proxy_on_http_call_response")
                .ok(),
            tick: instance.get_typed_func(&mut *store, "proxy_on_tick").ok(),
            queue_ready: instance
                .get_typed_func(&mut *store, "proxy_on_queue_ready")
                .ok(),
            done: instance.get_typed_func(&mut *store, "proxy_on_done").ok(),
            log: instance.get_typed_func(&mut *store, "proxy_on_log").ok(),
            delete: instance.get_typed_func(&mut *store, "proxy_on_delete").ok(),
        }
    }
}

/// One VM: a `Store` and an instance, used by one worker thread.
pub struct Vm {
    store: Store<HostState>,
    callbacks: Callbacks,
    next_context: u32,
    failed: Option<String>,
}

impl Vm {
    fn initialize(&mut self, instance: &Instance) -> Result<(), HostError> {
        let start = instance
            .get_typed_func::<(), ()>(&mut self.store, "_initialize")
            .or_else(|_| instance.get_typed_func::<(), ()>(&mut self.store, "_start"));
        if let Ok(start) = start {
            start
                .call(&mut self.store, ())
                .map_err(|e| self.trapped(e))?;
        }
        let root = ROOT_CONTEXT as i32;
        if let Some(create) = self.callbacks.context_create.clone() {
            create
                .call(&mut self.store, (root, 0))
                .map_err(|e| self.trapped(e))?;
        }
        let vm_config_len = self.store.data().plugin.vm_config.len() as i32;
        if let Some(vm_start) = self.callbacks.vm_start.clone() {
            self.store.data_mut().phase = Phase::VmStart;
            let ok = vm_start.call(&mut self.store, (root, vm_config_len));
            self.store.data_mut().phase = Phase::Other;
            if ok.map_err(|e| self.trapped(e))? == 0 {
                return Err(HostError::VmStartRejected);
            }
        }
        self.configure()
    }

    /// `proxy_on_configure` with the plugin's current configuration, which buffer 7 serves
    /// for the length of the call.
    fn configure(&mut self) -> Result<(), HostError> {
        let Some(configure) = self.callbacks.configure.clone() else {
            return Ok(());
        };
        let config = self.store.data().plugin.current_config();
        let config_len = config.len() as i32;
        self.store.data_mut().configuration = Some(config);
        self.store.data_mut().phase = Phase::Configure;
        let ok = configure.call(&mut self.store, (ROOT_CONTEXT as i32, config_len));
        self.store.data_mut().phase = Phase::Other;
        self.store.data_mut().configuration = None;
        if ok.map_err(|e| self.trapped(e))? == 0 {
            return Err(HostError::ConfigureRejected);
        }
        Ok(())
    }

    /// Hands a running VM the plugin's current configuration ([`Plugin::set_plugin_config`]),
    /// as Envoy does when a filter's configuration changes, without dropping its streams. A
    /// refusal leaves the VM running with whatever the filter kept (azgate's filter keeps its
    /// previous configuration).
    pub fn reconfigure(&mut self) -> Result<(), HostError> {
        self.check()?;
        self.configure()
    }

    fn trapped(&mut self, error: wasmtime::Error) -> HostError {
        let message = format!("{error:#}");
        self.failed = Some(message.clone());
        HostError::Trap(message)
    }

    fn check(&self) -> Result<(), HostError> {
        match &self.failed {
            Some(message) => Err(HostError::Failed(message.clone())),
            None => Ok(()),
        }
    }

    /// This VM's process-unique id (owner of the shared queues it registers).
    pub fn uid(&self) -> u64 {
        self.store.data().vm_uid
    }

    /// True once a callback trapped: the VM must be replaced.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Creates an HTTP stream context with its request headers.
    pub fn create_stream(
        &mut self,
        request_headers: HeaderList,
        info: StreamInfo,
    ) -> Result<u32, HostError> {
        self.check()?;
        let id = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(ROOT_CONTEXT + 1);
        let state = self.store.data_mut();
        state.streams.insert(
            id,
            Stream {
                request_headers,
                info,
                ..Stream::default()
            },
        );
        state.effective = id;
        if let Some(create) = self.callbacks.context_create.clone() {
            create
                .call(&mut self.store, (id as i32, ROOT_CONTEXT as i32))
                .map_err(|e| self.trapped(e))?;
        }
        Ok(id)
    }

    /// `proxy_on_request_headers`.
    pub fn on_request_headers(
        &mut self,
        id: u32,
        end_of_stream: bool,
    ) -> Result<Action, HostError> {
        self.check()?;
        let Some(callback) = self.callbacks.request_headers.clone() else {
            return Ok(Action::Continue);
        };
        let count = self
            .stream(id)
            .map(|s| s.request_headers.len())
            .unwrap_or(0) as i32;
        self.set_open(id, |s| &mut s.request_headers_open, true);
        let action = self.call_headers(&callback, id, count, end_of_stream)?;
        if action == Action::Continue && !self.answered(id) {
            self.set_open(id, |s| &mut s.request_headers_open, false);
        }
        Ok(action)
    }

    /// Opens or closes a header map of stream `id` to the filter.
    fn set_open(&mut self, id: u32, flag: impl FnOnce(&mut Stream) -> &mut bool, open: bool) {
        if let Some(stream) = self.store.data_mut().streams.get_mut(&id) {
            *flag(stream) = open;
        }
    }

    /// The last callback sent a local response for stream `id` (Envoy then treats the callback
    /// as stopped, whatever it returned).
    fn answered(&self, id: u32) -> bool {
        self.store
            .data()
            .effects
            .actions
            .iter()
            .any(|(stream, action)| {
                *stream == id && matches!(action, StreamAction::LocalResponse(_))
            })
    }

    /// `proxy_on_response_headers`, after storing the upstream's response headers.
    pub fn on_response_headers(
        &mut self,
        id: u32,
        headers: HeaderList,
        end_of_stream: bool,
    ) -> Result<Action, HostError> {
        self.check()?;
        let count = headers.len() as i32;
        if let Some(stream) = self.store.data_mut().streams.get_mut(&id) {
            stream.response_headers = headers;
        }
        let Some(callback) = self.callbacks.response_headers.clone() else {
            return Ok(Action::Continue);
        };
        self.set_open(id, |s| &mut s.response_headers_open, true);
        let action = self.call_headers(&callback, id, count, end_of_stream)?;
        if action == Action::Continue && !self.answered(id) {
            self.set_open(id, |s| &mut s.response_headers_open, false);
        }
        Ok(action)
    }

    /// Runs a request- or response-headers callback on stream `id`.
    fn call_headers(
        &mut self,
        callback: &TypedFunc<(i32, i32, i32), i32>,
        id: u32,
        count: i32,
        end_of_stream: bool,
    ) -> Result<Action, HostError> {
        self.store.data_mut().effective = id;
        let raw = callback
            .call(
                &mut self.store,
                (id as i32, count, i32::from(end_of_stream)),
            )
            .map_err(|e| self.trapped(e))?;
        Ok(Action::from_raw(raw))
    }

    /// Delivers a call-out's answer (on the root context, as Envoy does).
    pub fn on_http_call_response(
        &mut self,
        token: u32,
        response: CallResponse,
    ) -> Result<(), HostError> {
        self.check()?;
        let Some(callback) = self.callbacks.http_call_response.clone() else {
            return Ok(());
        };
        let (headers, body, trailers) = (
            response.headers.len() as i32,
            response.body.len() as i32,
            response.trailers.len() as i32,
        );
        let state = self.store.data_mut();
        state.last_status = if response.headers.is_empty() {
            // Envoy's report of a reset: BrokenConnection (11), "reset".
            (11, b"reset".to_vec())
        } else {
            (0, Vec::new())
        };
        state.call_response = Some(response);
        state.effective = ROOT_CONTEXT;
        let result = callback.call(
            &mut self.store,
            (ROOT_CONTEXT as i32, token as i32, headers, body, trailers),
        );
        self.store.data_mut().call_response = None;
        result.map_err(|e| self.trapped(e))
    }

    /// `proxy_on_tick` on the root context.
    pub fn on_tick(&mut self) -> Result<(), HostError> {
        self.check()?;
        if let Some(tick) = self.callbacks.tick.clone() {
            self.store.data_mut().effective = ROOT_CONTEXT;
            tick.call(&mut self.store, ROOT_CONTEXT as i32)
                .map_err(|e| self.trapped(e))?;
        }
        Ok(())
    }

    /// `proxy_on_queue_ready` on the root context.
    pub fn on_queue_ready(&mut self, queue: u32) -> Result<(), HostError> {
        self.check()?;
        if let Some(ready) = self.callbacks.queue_ready.clone() {
            self.store.data_mut().effective = ROOT_CONTEXT;
            ready
                .call(&mut self.store, (ROOT_CONTEXT as i32, queue as i32))
                .map_err(|e| self.trapped(e))?;
        }
        Ok(())
    }

    /// Ends a stream in Envoy's order: `proxy_on_log`, `proxy_on_done`, `proxy_on_delete`.
    pub fn finish_stream(&mut self, id: u32) -> Result<(), HostError> {
        if !self.store.data().streams.contains_key(&id) {
            return Ok(());
        }
        let result = self.finish_callbacks(id);
        self.store.data_mut().streams.remove(&id);
        result
    }

    fn finish_callbacks(&mut self, id: u32) -> Result<(), HostError> {
        self.check()?;
        self.store.data_mut().effective = id;
        if let Some(log) = self.callbacks.log.clone() {
            self.store.data_mut().access_log = true;
            let logged = log.call(&mut self.store, id as i32);
            self.store.data_mut().access_log = false;
            logged.map_err(|e| self.trapped(e))?;
        }
        // After the access log, Envoy offers no header maps any more.
        self.set_open(id, |s| &mut s.request_headers_open, false);
        self.set_open(id, |s| &mut s.response_headers_open, false);
        if let Some(done) = self.callbacks.done.clone() {
            done.call(&mut self.store, id as i32)
                .map_err(|e| self.trapped(e))?;
        }
        if let Some(delete) = self.callbacks.delete.clone() {
            delete
                .call(&mut self.store, id as i32)
                .map_err(|e| self.trapped(e))?;
        }
        Ok(())
    }

    /// The stream's state (headers as the filter left them).
    pub fn stream(&self, id: u32) -> Option<&Stream> {
        self.store.data().streams.get(&id)
    }

    /// Takes what the last callbacks asked for.
    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.store.data_mut().effects)
    }

    /// Streams still open in this VM.
    pub fn open_streams(&self) -> Vec<u32> {
        self.store.data().streams.keys().copied().collect()
    }
}
