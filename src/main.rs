//! `fedslm`: federated learning of synchronous liver metastasis prediction from rectal cancer MRI.
//! The one binary; each subcommand lives in `cli/`.

mod cli;

use clap::Parser;

/// glibc's allocator, set for what this process does, before any other thread starts.
///
/// Training allocates and frees the same large activation buffers at every step. glibc hands blocks above
/// its mmap threshold back to the kernel on free and trims the heap's top, so each step faults them in again
/// and the kernel zeroes every page (ResNet-18: 2.7 -> 2.2 s per step, BENCHMARKS.md). Keep them: every block
/// comes from the heap (glibc's mmap threshold stops at 32 MiB, below ResNet-18's 51 MB activations, so
/// mapping is switched off rather than raised: 720-730 thousand page faults to 250-260 thousand in four
/// steps), and the heap is not trimmed below 1 GiB of free top.
///
/// The server is the opposite: a round's buffers (an update being read, the accumulators, the next model)
/// are freed when the round ends, and kept ones pile up in one heap per thread that touched them (ResNet-18,
/// 2 centres: 290-380 MiB at peak with the training settings, 196-205 with these, BENCHMARKS.md). One heap
/// for all threads, every block of 1 MiB or more mapped on its own and unmapped when freed, and the heap's free
/// pages handed back to the system five times a second.
fn tune_allocator(serving: bool) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets the allocator's parameters; called before any other thread starts.
        unsafe {
            if serving {
                libc::mallopt(libc::M_ARENA_MAX, 1);
                libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
            } else {
                libc::mallopt(libc::M_MMAP_MAX, 0);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        }
        if serving {
            // QUIC's many small receive buffers leave free holes inside the heap that glibc returns only
            // from its top: among 50 centres they were a sixth of the peak (254 MiB; 220 MiB with this).
            // Handing the free pages back five times a second cost nothing measurable in a round.
            std::thread::spawn(|| loop {
                std::thread::sleep(std::time::Duration::from_millis(200));
                // SAFETY: malloc_trim only returns the allocator's free pages to the system.
                unsafe { libc::malloc_trim(0) };
            });
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = serving;
}

fn main() -> std::process::ExitCode {
    // Like other command-line tools, end quietly when the reader of our output goes away (`fedslm ... | head`)
    // instead of panicking on a broken pipe. SAFETY: restoring a signal's default action before any thread
    // starts has no preconditions.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // The thread settings training reads (kernels::settle_threads: the default simulation in 84-101 s instead
    // of 124-135 s on 2 cores, BENCHMARKS.md). SAFETY: no other thread has started.
    unsafe { fedslm_model::kernels::settle_threads() };
    let args = cli::Cli::parse();
    tune_allocator(args.serves());
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
