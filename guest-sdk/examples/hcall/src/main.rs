//! Makes N WALLTIME hypercalls (`hcall N`, default 0) and prints how many
//! it made; `tt-bench hypercall` times it to get the hypercall round trip
//! from CPL 3.
#![no_std]
#![no_main]

tt_guest::main!(app_main);

fn app_main() -> i32 {
    let n: u64 = match tt_guest::boot::args().next().map(str::parse) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            tt_guest::println!("hcall: usage: hcall [N]");
            return 2;
        }
    };
    let mut last = 0;
    for _ in 0..n {
        let now = tt_guest::hypercall::walltime();
        if now < last {
            tt_guest::println!("hcall: wall clock went backwards");
            return 1;
        }
        last = now;
    }
    tt_guest::println!("hcall: {n} WALLTIME hypercalls");
    0
}
