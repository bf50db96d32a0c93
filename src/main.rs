//! `fedslm`: federated learning of synchronous liver metastasis prediction from rectal cancer MRI.
//! The one binary; each subcommand lives in `cli/`.

mod cli;

use clap::Parser;

/// Training allocates and frees the same large activation buffers at every step. glibc hands blocks above
/// its mmap threshold back to the kernel on free and trims the heap's top, so each step faults them in again
/// and the kernel zeroes every page (ResNet-18: 2.7 -> 2.2 s per step, BENCHMARKS.md). Keep them: blocks up
/// to glibc's largest threshold come from the heap, and the heap is not trimmed below 1 GiB of free top.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's parameters; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> std::process::ExitCode {
    // Like other command-line tools, end quietly when the reader of our output goes away (`fedslm ... | head`)
    // instead of panicking on a broken pipe. SAFETY: restoring a signal's default action before any thread
    // starts has no preconditions.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // candle's own thread pool spins 25,000 rounds after each op before it sleeps; our kernels run on rayon's
    // threads, and on a small CPU that spinning takes the cores they need (2 cores: 44 -> 33 ms per training
    // step of the default network). Set before any thread starts, as set_var requires.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    keep_freed_memory();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The chain of causes, each once: our errors often name their source in their own message.
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message.push_str(": ");
                    message.push_str(&cause);
                }
            }
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}
