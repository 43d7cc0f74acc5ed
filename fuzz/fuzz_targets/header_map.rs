//! The host's proxy-wasm pair serialisation (`azgate_wasmhost::{serialize_pairs,
//! deserialize_pairs}`, what header maps, local responses and call-outs cross the ABI in).
//! The input is read twice: as serialised bytes (decode must not panic, and what it decodes
//! re-encodes to bytes that decode to the same pairs) and, through `arbitrary`, as a list of
//! pairs (decode(encode(pairs)) == pairs, in the documented layout).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use azgate_wasmhost::{deserialize_pairs, serialize_pairs};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(pairs) = deserialize_pairs(data) {
        let again = serialize_pairs(&pairs);
        assert_eq!(deserialize_pairs(&again).as_ref(), Some(&pairs));
    }
    let mut input = Unstructured::new(data);
    let Ok(pairs) = Vec::<(Vec<u8>, Vec<u8>)>::arbitrary(&mut input) else {
        return;
    };
    let bytes = serialize_pairs(&pairs);
    if pairs.is_empty() {
        assert!(bytes.is_empty(), "an empty map is empty bytes");
    } else {
        let expected: usize = 4 + pairs
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len() + 2)
            .sum::<usize>();
        assert_eq!(bytes.len(), expected);
        assert_eq!(&bytes[..4], &(pairs.len() as u32).to_le_bytes());
    }
    assert_eq!(deserialize_pairs(&bytes), Some(pairs.clone()), "round trip");
    // A truncated map is refused, never read past its end.
    if !bytes.is_empty() {
        assert!(
            deserialize_pairs(&bytes[..bytes.len() - 1]).is_none(),
            "truncated map accepted"
        );
    }
});
