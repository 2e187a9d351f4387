//! The UniFFI bindings generator, built with this crate's UniFFI version so that the generated
//! Kotlin, Swift and Python match the library (`mobile-ffi/generate.sh` runs it).

fn main() {
    uniffi::uniffi_bindgen_main()
}
