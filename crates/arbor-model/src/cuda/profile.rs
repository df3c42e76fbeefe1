//! The per-phase profile of the forward pass (`CudaOptions::profile`).

use super::*;

/// Per-section GPU time of forward steps, with [`CudaOptions::profile`]: each mark waits for
/// the GPU, so profiling slows the steps down; it says where the time goes, not how long a
/// step takes.
pub(crate) struct Profiler {
    stream: Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>>,
    last: std::time::Instant,
}

pub(crate) static PROFILE: std::sync::Mutex<Vec<(&'static str, f64, u64)>> =
    std::sync::Mutex::new(Vec::new());

impl Profiler {
    pub(crate) fn start(dev: &CudaDevice, enabled: bool) -> Self {
        let stream = enabled.then(|| dev.cuda_stream());
        if let Some(s) = &stream {
            let _ = s.synchronize();
        }
        Self {
            stream,
            last: std::time::Instant::now(),
        }
    }

    pub(crate) fn mark(&mut self, name: &'static str) {
        let Some(s) = &self.stream else { return };
        let _ = s.synchronize();
        let now = std::time::Instant::now();
        let dt = (now - self.last).as_secs_f64();
        self.last = now;
        let mut p = PROFILE.lock().unwrap_or_else(|e| e.into_inner());
        match p.iter_mut().find(|e| e.0 == name) {
            Some(e) => {
                e.1 += dt;
                e.2 += 1;
            }
            None => p.push((name, dt, 1)),
        }
    }
}

/// The profile gathered so far by models with [`CudaOptions::profile`], and clears it.
pub fn take_profile() -> Vec<(&'static str, f64, u64)> {
    std::mem::take(&mut *PROFILE.lock().unwrap_or_else(|e| e.into_inner()))
}
