//! The host side of the CUDA provider, checked and prepared before any session is built.
//!
//! - Is the NVIDIA driver new enough for this ONNX Runtime's CUDA provider? A CUDA 13 image on a CUDA 12 host must
//!   stop with a sentence naming the driver, what the provider needs and the fix, not with a CUDA error from deep
//!   inside the first session build. The driver's version comes from `cuDriverGetVersion` in `libcuda.so.1`
//!   (mounted by the NVIDIA container toolkit; the call needs no device and no context). The CUDA major version the
//!   provider was built for comes from the `libcudart.so.<major>` it links against, read from its dynamic string
//!   table.
//! - Does the driver see a GPU, and CUDA_DEVICE_ID among them? A driver without a visible device (a container
//!   started without one on a GPU host, CUDA_VISIBLE_DEVICES empty) is CUDA-unusable: SEGMENTER_DEVICE=cuda stops
//!   with that sentence, `auto` falls back to the CPU, instead of failing in the first session build
//!   (`cuInit`, `cuDeviceGetCount`: no context is created).
//! - Preloading the CUDA libraries from a pip-style folder: ort's `preload_dylibs` knows only CUDA 13's names, so a
//!   CUDA 12 provider (onnxruntime-gpu <= 1.26) gets the CUDA 12 names that provider links against.

use std::path::Path;

/// A CUDA version as the driver API reports it: 12040 = 12.4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CudaVersion(pub i32);

impl CudaVersion {
    pub fn major(self) -> i32 {
        self.0 / 1000
    }
}

impl std::fmt::Display for CudaVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0 / 1000, (self.0 % 1000) / 10)
    }
}

/// The oldest Linux driver that runs a CUDA major line (NVIDIA's compatibility table; minor versions of the same
/// major run on it through minor-version compatibility).
pub fn min_driver_for(major: i32) -> &'static str {
    match major {
        ..=11 => "450",
        12 => "525",
        _ => "580",
    }
}

/// What the installed driver says: the newest CUDA version it supports and how many GPUs this process sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Driver {
    pub cuda: CudaVersion,
    pub devices: i32,
}

/// CUresult CUDA_ERROR_NO_DEVICE: `cuInit` on a host (or in a container) with a driver but no visible GPU.
const CUDA_ERROR_NO_DEVICE: libc::c_int = 100;

/// The installed driver (`libcuda.so.1`, which the NVIDIA container toolkit mounts), or why it cannot be asked.
pub fn driver() -> Result<Driver, String> {
    driver_from(c"libcuda.so.1")
}

/// `driver` from the library `lib` (a path, or a name the dynamic loader looks up).
#[allow(unsafe_code)] // dlopen/dlsym and three C calls; nothing else in the crate talks to the driver
pub fn driver_from(lib: &std::ffi::CStr) -> Result<Driver, String> {
    use std::ffi::CStr;
    // SAFETY: dlopen with a NUL-terminated name; the handle is checked before use and kept (see the end).
    let handle = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let why = unsafe { libc::dlerror() };
        let why = if why.is_null() {
            "not found".to_string()
        } else {
            // SAFETY: non-null, NUL-terminated, valid until the next dl* call on this thread.
            unsafe { CStr::from_ptr(why) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(format!(
            "no NVIDIA driver: {} cannot be loaded ({why}); in a container the NVIDIA container toolkit \
             mounts it when the container is given a GPU (--gpus, a compose device reservation, an nvidia.com/gpu \
             limit)",
            lib.to_string_lossy()
        ));
    }
    // One `int f(int *)`-shaped entry point of the driver API, or why it is missing.
    let symbol = |name: &CStr| {
        // SAFETY: a valid handle and a NUL-terminated symbol name.
        let symbol = unsafe { libc::dlsym(handle, name.as_ptr()) };
        if symbol.is_null() {
            Err(format!(
                "{} has no {}",
                lib.to_string_lossy(),
                name.to_string_lossy()
            ))
        } else {
            Ok(symbol)
        }
    };
    let result = (|| {
        // SAFETY: `CUresult cuDriverGetVersion(int *driverVersion)` in every CUDA driver since 2.2; the pointer is to
        // a live local.
        let get_version = unsafe {
            std::mem::transmute::<*mut libc::c_void, extern "C" fn(*mut libc::c_int) -> libc::c_int>(
                symbol(c"cuDriverGetVersion")?,
            )
        };
        let mut version: libc::c_int = 0;
        match get_version(&mut version) {
            0 => {}
            code => return Err(format!("cuDriverGetVersion failed with CUresult {code}")),
        }
        // SAFETY: `CUresult cuInit(unsigned int Flags)` (Flags must be 0); it creates no context, and ONNX Runtime's
        // CUDA runtime calls it again (a no-op then) when the provider starts.
        let init = unsafe {
            std::mem::transmute::<*mut libc::c_void, extern "C" fn(libc::c_uint) -> libc::c_int>(
                symbol(c"cuInit")?,
            )
        };
        // SAFETY: `CUresult cuDeviceGetCount(int *count)`; the pointer is to a live local.
        let get_count = unsafe {
            std::mem::transmute::<*mut libc::c_void, extern "C" fn(*mut libc::c_int) -> libc::c_int>(
                symbol(c"cuDeviceGetCount")?,
            )
        };
        let devices = match init(0) {
            0 => {
                let mut count: libc::c_int = 0;
                match get_count(&mut count) {
                    0 => count,
                    code => return Err(format!("cuDeviceGetCount failed with CUresult {code}")),
                }
            }
            CUDA_ERROR_NO_DEVICE => 0,
            code => {
                return Err(format!(
                    "cuInit failed with CUresult {code}: the driver cannot start"
                ));
            }
        };
        Ok(Driver {
            cuda: CudaVersion(version),
            devices,
        })
    })();
    // The handle stays open: once cuInit has run, unloading the driver could run its teardown under ONNX Runtime,
    // which loads the same library for the provider anyway (one reference more to a library that stays loaded).
    result
}

/// Why CUDA_DEVICE_ID cannot run on what the driver sees, if it cannot.
fn device_problem(driver: Driver, device_id: i32) -> Option<String> {
    if driver.devices == 0 {
        return Some(
            "the NVIDIA driver is installed but sees no GPU: the container was started without one (--gpus, a \
             compose device reservation, an nvidia.com/gpu limit), or CUDA_VISIBLE_DEVICES hides them all"
                .into(),
        );
    }
    (device_id >= driver.devices).then(|| {
        format!(
            "CUDA_DEVICE_ID={device_id}, but the driver sees {} GPU(s), numbered from 0 (CUDA_VISIBLE_DEVICES \
             renumbers the GPUs it lists from 0)",
            driver.devices
        )
    })
}

/// The CUDA major version a provider library was built for: N from the `libcudart.so.N` it needs. None when the
/// library cannot be read or names no CUDA runtime.
pub fn provider_cuda_major(provider_lib: &Path) -> Option<i32> {
    use std::io::Read;
    // The dynamic string table sits in the first loadable segment, within the first few MB of the file (the
    // library is ~300 MB: reading all of it would cost a second on a cold volume).
    let mut head = Vec::with_capacity(8 << 20);
    std::fs::File::open(provider_lib)
        .ok()?
        .take(8 << 20)
        .read_to_end(&mut head)
        .ok()?;
    cudart_major(&head)
}

fn cudart_major(bytes: &[u8]) -> Option<i32> {
    const NEEDLE: &[u8] = b"libcudart.so.";
    let at = bytes.windows(NEEDLE.len()).position(|w| w == NEEDLE)? + NEEDLE.len();
    let digits: Vec<u8> = bytes[at..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// `libonnxruntime_providers_cuda.so` beside the ONNX Runtime library (the wheels' and the images' layout).
pub fn provider_library(ort_dylib: &Path) -> Option<std::path::PathBuf> {
    let path = ort_dylib.parent()?.join("libonnxruntime_providers_cuda.so");
    path.is_file().then_some(path)
}

/// Checks the installed driver against the CUDA major version the provider needs (None: unknown, only the driver's
/// presence is checked), and that it sees the GPU `device_id`. Err names the driver's CUDA version, what the
/// provider needs, the minimum driver and the way out; or what the driver sees.
pub fn check_driver(needed: Option<i32>, device_id: i32) -> Result<(), String> {
    let driver = driver()?;
    match needed {
        Some(needed) => judge(driver.cuda, needed)?,
        None => tracing::info!(
            driver_cuda = %driver.cuda,
            "NVIDIA driver found; the CUDA provider's CUDA version is unknown"
        ),
    }
    match device_problem(driver, device_id) {
        Some(problem) => Err(problem),
        None => Ok(()),
    }
}

fn judge(driver: CudaVersion, needed: i32) -> Result<(), String> {
    if driver.major() >= needed {
        tracing::info!(driver_cuda = %driver, provider_cuda = needed, "NVIDIA driver is new enough for the CUDA provider");
        return Ok(());
    }
    let other_image = if driver.major() == 12 {
        ", or run the CUDA 12 image (segmenter-svc/Dockerfile target runtime-gpu-cu12, tag gpu-cu12)"
    } else {
        ""
    };
    Err(format!(
        "the NVIDIA driver supports CUDA {driver}, but this ONNX Runtime's CUDA provider is built for CUDA {needed}, \
         which needs driver >= {}: upgrade the host's driver{other_image} (docs/operations.md, \"Which image for \
         which driver\")",
        min_driver_for(needed),
    ))
}

/// The CUDA libraries a CUDA 12 provider (onnxruntime-gpu 1.19-1.26) links against, dependencies first.
const CUDA12_DYLIBS: &[&str] = &[
    "libcudart.so.12",
    "libcublasLt.so.12",
    "libcublas.so.12",
    "libcurand.so.10",
    "libcufft.so.11",
];

/// Preloads CUDA (`cuda_dir`) and cuDNN (`cudnn_dir`) from pip-style folders, with the names the provider needs.
pub fn preload(
    cuda_dir: Option<&Path>,
    cudnn_dir: Option<&Path>,
    needed: Option<i32>,
) -> Result<(), String> {
    if needed == Some(12) {
        if let Some(dir) = cuda_dir {
            for name in CUDA12_DYLIBS {
                ort::util::preload_dylib(dir.join(name)).map_err(|e| {
                    format!("failed to preload `{name}` from {}: {e}", dir.display())
                })?;
            }
        }
        return ort::ep::cuda::preload_dylibs(None, cudnn_dir).map_err(|e| e.to_string());
    }
    ort::ep::cuda::preload_dylibs(cuda_dir, cudnn_dir).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cuda_runtime_major_from_a_string_table() {
        let table = b"\0libcublasLt.so.13\0libcudart.so.13\0libcudnn.so.9\0";
        assert_eq!(cudart_major(table), Some(13));
        assert_eq!(cudart_major(b"\0libcudart.so.12\0"), Some(12));
        assert_eq!(cudart_major(b"\0libcublas.so.12\0"), None);
    }

    #[test]
    fn versions_print_like_nvidia_smi_and_map_to_drivers() {
        assert_eq!(CudaVersion(12040).to_string(), "12.4");
        assert_eq!(CudaVersion(13000).major(), 13);
        assert_eq!(min_driver_for(13), "580");
        assert_eq!(min_driver_for(12), "525");
    }

    #[test]
    fn an_old_driver_is_refused_with_the_way_out() {
        let e = judge(CudaVersion(12040), 13).unwrap_err();
        assert!(
            e.contains("supports CUDA 12.4")
                && e.contains("built for CUDA 13")
                && e.contains("driver >= 580")
                && e.contains("runtime-gpu-cu12"),
            "{e}"
        );
        let e = judge(CudaVersion(11080), 12).unwrap_err();
        assert!(
            e.contains("driver >= 525") && !e.contains("runtime-gpu-cu12"),
            "{e}"
        );
        assert!(judge(CudaVersion(13000), 13).is_ok());
        assert!(judge(CudaVersion(13010), 12).is_ok());
    }

    #[test]
    fn a_driver_without_the_gpu_asked_for_is_named() {
        let driver = |devices| Driver {
            cuda: CudaVersion(13000),
            devices,
        };
        let e = device_problem(driver(0), 0).unwrap();
        assert!(e.contains("sees no GPU"), "{e}");
        let e = device_problem(driver(2), 2).unwrap();
        assert!(
            e.contains("CUDA_DEVICE_ID=2") && e.contains("sees 2 GPU(s)"),
            "{e}"
        );
        assert_eq!(device_problem(driver(2), 1), None);
    }

    /// A stand-in libcuda.so.1 built with the C compiler rustc links with: what `driver_from` reads from a real
    /// driver's three entry points (no GPU here to ask a real one).
    fn fake_driver(dir: &Path, init_result: i32, devices: i32) -> std::ffi::CString {
        let source = dir.join(format!("fake_{init_result}_{devices}.c"));
        let lib = dir.join(format!("libfake_{init_result}_{devices}.so"));
        std::fs::write(
            &source,
            format!(
                "int cuDriverGetVersion(int *v) {{ *v = 12040; return 0; }}\n\
                 int cuInit(unsigned int flags) {{ return flags ? 1 : {init_result}; }}\n\
                 int cuDeviceGetCount(int *n) {{ *n = {devices}; return 0; }}\n"
            ),
        )
        .unwrap();
        let status = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&lib)
            .arg(&source)
            .status()
            .expect("cc, the C compiler rustc links with");
        assert!(status.success());
        std::ffi::CString::new(lib.to_str().unwrap()).unwrap()
    }

    #[test]
    fn the_driver_reports_its_version_and_the_gpus_it_sees() {
        let dir = tempfile::tempdir().unwrap();
        let two = driver_from(&fake_driver(dir.path(), 0, 2)).unwrap();
        assert_eq!(
            two,
            Driver {
                cuda: CudaVersion(12040),
                devices: 2
            }
        );
        // cuInit answers CUDA_ERROR_NO_DEVICE where the driver is mounted without a GPU.
        let none = driver_from(&fake_driver(dir.path(), 100, 0)).unwrap();
        assert_eq!(none.devices, 0);
        let e = driver_from(&fake_driver(dir.path(), 999, 0)).unwrap_err();
        assert!(e.contains("cuInit failed with CUresult 999"), "{e}");
        let e = driver_from(c"/nonexistent/libcuda.so.1").unwrap_err();
        assert!(e.contains("no NVIDIA driver"), "{e}");
    }

    #[test]
    fn the_cpu_library_names_no_cuda_runtime() {
        let lib = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../.tools/onnxruntime/libonnxruntime.so.1.31.1");
        if lib.exists() {
            assert_eq!(provider_cuda_major(&lib), None);
        }
    }
}
