//! Host functions called through raw imports, so that any status the host returns is observed
//! as a number. The SDK's wrappers panic on statuses they do not expect (a panic traps the VM,
//! which would end the probe run in Envoy); these return the status instead.

#![allow(
    unsafe_code,
    reason = "raw proxy-wasm imports; every pointer is to a live local"
)]
#![allow(
    clashing_extern_declarations,
    reason = "the SDK declares the same imports with enum status types; the wasm signatures are identical"
)]

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_define_metric(kind: u32, name: *const u8, name_len: usize, id: *mut u32) -> u32;
    fn proxy_get_metric(id: u32, value: *mut u64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
    fn proxy_increment_metric(id: u32, delta: i64) -> u32;
}

/// `proxy_define_metric`: (status, id).
pub fn define_metric(kind: u32, name: &str) -> (u32, u32) {
    let mut id = 0u32;
    // SAFETY: `name` is a live slice of `name.len()` bytes; `id` is a live local.
    let status = unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) };
    (status, id)
}

/// `proxy_get_metric`: (status, value).
pub fn get_metric(id: u32) -> (u32, u64) {
    let mut value = 0u64;
    // SAFETY: `value` is a live local.
    let status = unsafe { proxy_get_metric(id, &mut value) };
    (status, value)
}

/// `proxy_record_metric`: status.
pub fn record_metric(id: u32, value: u64) -> u32 {
    // SAFETY: no pointers.
    unsafe { proxy_record_metric(id, value) }
}

/// `proxy_increment_metric`: status.
pub fn increment_metric(id: u32, delta: i64) -> u32 {
    // SAFETY: no pointers.
    unsafe { proxy_increment_metric(id, delta) }
}

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_set_property(path: *const u8, path_len: usize, value: *const u8, len: usize) -> u32;
}

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_len: usize,
        value: *const u8,
        value_len: usize,
    ) -> u32;
}

/// `proxy_replace_header_map_value` on `map`: status.
pub fn replace_header(map: u32, key: &str, value: &str) -> u32 {
    // SAFETY: both slices are live for the duration of the call.
    unsafe {
        proxy_replace_header_map_value(map, key.as_ptr(), key.len(), value.as_ptr(), value.len())
    }
}

/// `proxy_set_property` with the path segments joined by NUL: status.
pub fn set_property(path: &[&str], value: &[u8]) -> u32 {
    let path = path.join("\0");
    // SAFETY: both slices are live for the duration of the call.
    unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) }
}

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_get_header_map_value(
        map: u32,
        key: *const u8,
        key_len: usize,
        value: *mut *mut u8,
        value_len: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(map: u32, pairs: *mut *mut u8, pairs_len: *mut usize) -> u32;
}

/// Takes ownership of a buffer the host allocated in this module (through
/// `proxy_on_memory_allocate`, as the SDK does for every returned buffer).
fn take(ptr: *mut u8, len: usize) -> Vec<u8> {
    if ptr.is_null() || len == 0 {
        return Vec::new();
    }
    // SAFETY: the host allocated exactly `len` bytes with the SDK's allocator, which hands out
    // `Vec<u8>` allocations of that capacity, and gave up ownership.
    unsafe { Vec::from_raw_parts(ptr, len, len) }
}

/// `proxy_get_header_map_value`: (status, value).
pub fn get_header(map: u32, key: &str) -> (u32, Vec<u8>) {
    let (mut ptr, mut len) = (std::ptr::null_mut::<u8>(), 0usize);
    // SAFETY: `key` is live; `ptr` and `len` are live locals the host writes.
    let status =
        unsafe { proxy_get_header_map_value(map, key.as_ptr(), key.len(), &mut ptr, &mut len) };
    (status, take(ptr, len))
}

/// `proxy_get_header_map_pairs`: (status, number of pairs).
pub fn pair_count(map: u32) -> (u32, u32) {
    let (mut ptr, mut len) = (std::ptr::null_mut::<u8>(), 0usize);
    // SAFETY: `ptr` and `len` are live locals the host writes.
    let status = unsafe { proxy_get_header_map_pairs(map, &mut ptr, &mut len) };
    let bytes = take(ptr, len);
    let count = bytes
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_le_bytes);
    (status, count)
}
