//! Adapter selection. A binary of its own: it changes process-wide environment.

use polyak_gpu::{Error, GpuContext};

#[test]
fn adapter_choice_and_the_no_adapter_message() {
    let ctx = GpuContext::software().expect("a software adapter (lavapipe or llvmpipe)");
    let info = ctx.adapter_info().unwrap();
    assert_eq!(info.device_type, wgpu::DeviceType::Cpu);
    // the device got the adapter's limits, not wgpu's defaults
    assert!(ctx.limits().max_buffer_size > wgpu::Limits::default().max_buffer_size);

    // SAFETY: no other thread of this test binary reads the environment meanwhile.
    unsafe { std::env::set_var("WGPU_ADAPTER_NAME", "no such adapter anywhere") };
    match GpuContext::new() {
        Err(e @ Error::NoAdapter { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("apt-get install -y mesa-vulkan-drivers"),
                "{msg}"
            );
            assert!(msg.contains("no such adapter anywhere"), "{msg}");
        }
        other => panic!("expected NoAdapter, got {other:?}"),
    }
    unsafe { std::env::set_var("WGPU_ADAPTER_NAME", &info.name) };
    assert_eq!(
        GpuContext::new().unwrap().adapter_info().unwrap().name,
        info.name
    );
    unsafe { std::env::remove_var("WGPU_ADAPTER_NAME") };
}
