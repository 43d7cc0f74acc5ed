//! Guest memory, touched only through these bounds-checked helpers: a bad pointer or length
//! is a trap (an `Err`), never a panic.

use wasmtime::{Memory, bail, format_err};

use super::Ctx;

pub(super) fn memory(caller: &Ctx<'_>) -> wasmtime::Result<Memory> {
    caller
        .data()
        .memory
        .ok_or_else(|| format_err!("the module exports no memory"))
}

pub(super) fn range(ptr: i32, len: i32) -> wasmtime::Result<std::ops::Range<usize>> {
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(len as u32 as usize)
        .ok_or_else(|| format_err!("guest pointer/length overflows"))?;
    Ok(start..end)
}

/// Copies `len` bytes at `ptr` out of guest memory.
pub(super) fn read(caller: &Ctx<'_>, ptr: i32, len: i32) -> wasmtime::Result<Vec<u8>> {
    let mem = memory(caller)?;
    mem.data(caller)
        .get(range(ptr, len)?)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| format_err!("guest pointer/length out of bounds"))
}

/// [`read`], as text: invalid UTF-8 replaced by U+FFFD (copied once more only then).
pub(super) fn read_string(caller: &Ctx<'_>, ptr: i32, len: i32) -> wasmtime::Result<String> {
    Ok(String::from_utf8(read(caller, ptr, len)?)
        .unwrap_or_else(|invalid| String::from_utf8_lossy(invalid.as_bytes()).into_owned()))
}

/// Writes `bytes` at `ptr` in guest memory.
pub(super) fn write(caller: &mut Ctx<'_>, ptr: i32, bytes: &[u8]) -> wasmtime::Result<()> {
    let mem = memory(caller)?;
    let target = mem
        .data_mut(&mut *caller)
        .get_mut(range(ptr, bytes.len() as i32)?)
        .ok_or_else(|| format_err!("guest pointer out of bounds"))?;
    target.copy_from_slice(bytes);
    Ok(())
}

pub(super) fn write_u32(caller: &mut Ctx<'_>, ptr: i32, value: u32) -> wasmtime::Result<()> {
    write(caller, ptr, &value.to_le_bytes())
}

/// Hands `bytes` to the guest: allocated with its own allocator at exactly their size (the Rust
/// SDK frees them with `Vec::from_raw_parts(ptr, size, size)`), or ptr=0, size=0 when empty.
pub(super) fn copy_out(
    caller: &mut Ctx<'_>,
    bytes: &[u8],
    ptr_ptr: i32,
    size_ptr: i32,
) -> wasmtime::Result<()> {
    if bytes.is_empty() {
        write_u32(caller, ptr_ptr, 0)?;
        return write_u32(caller, size_ptr, 0);
    }
    let len = i32::try_from(bytes.len()).map_err(|_| format_err!("buffer too large"))?;
    // Taken out and put back rather than cloned: cloning a typed function handle costs a
    // type-registry round trip on every buffer handed to the guest.
    let allocate = caller
        .data_mut()
        .allocate
        .take()
        .ok_or_else(|| format_err!("the module exports no allocator"))?;
    let result = allocate.call(&mut *caller, len);
    caller.data_mut().allocate = Some(allocate);
    let ptr = result?;
    if ptr == 0 {
        bail!("the guest allocator failed for {len} bytes");
    }
    write(caller, ptr, bytes)?;
    write_u32(caller, ptr_ptr, ptr as u32)?;
    write_u32(caller, size_ptr, len as u32)
}
