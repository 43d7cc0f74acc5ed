;; A proxy-wasm (ABI 0.2.1) module that does nothing: every request and response continues
;; untouched. `make bench` runs it in `azgate serve` as configuration (c), "serve without the
;; filter", so (d) − (c) is what the filter's own logic costs; the VM and the ABI calls around
;; each request still run.
(module
  (memory (export "memory") 2)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "_initialize"))
  ;; The host may copy data in (the plugin configuration); the module never reads it, so one
  ;; scratch region serves every allocation.
  (func (export "malloc") (param $size i32) (result i32)
    (if (i32.gt_u (local.get $size) (i32.const 65536)) (then unreachable))
    (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32)))
