//! Snapshot save and restore of devices (Firecracker style): every stateful device turns
//! its guest-visible state into plain data ([`Persist::save`]) and is built again from it
//! ([`Persist::restore`]) with whatever the monitor provides that is not guest state (an
//! interrupt eventfd, guest memory, the vsock switch...).
//!
//! A state comes from a file on disk: `restore` validates it and fails with the device's
//! error instead of trusting it.
//!
//! [`round_trip`] (and the [`persist_round_trip!`](crate::persist_round_trip) test macro
//! built on it) exercises every device the same way: build, drive into a non-trivial state,
//! save, JSON and back, restore into a fresh instance, save again (same state), then check
//! that the restored device behaves as the original would have.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A device whose state can be saved and restored.
pub trait Persist: Sized {
    /// The saved state: plain data, serializable.
    type State: Serialize + DeserializeOwned + std::fmt::Debug;
    /// What a restore needs besides the state (resources that are not guest state).
    type ConstructorArgs;
    /// Why a state cannot be restored.
    type Error: std::error::Error;

    /// The device's state now (a kernel-backed object, such as a vCPU, can fail to say).
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// A device built from `state`, validated.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// What must be quiet at a snapshot's cut (crosvm's `Suspendable`): asleep, it changes no
/// guest-visible state (no guest memory, no registers, no queues) until woken. The monitor
/// puts every partition and the vsock switch to sleep for the cut and wakes them in reverse
/// order. `sleep` on something already quiet (an operator-paused partition) does nothing,
/// and the matching `wake` leaves it as it was.
pub trait Suspendable {
    /// Why it could not be put to sleep (it was not, and nothing changed).
    type Error: std::error::Error;

    /// Quiets it; when this returns, nothing changes until [`Suspendable::wake`].
    fn sleep(&mut self) -> Result<(), Self::Error>;

    /// Undoes the matching [`Suspendable::sleep`].
    fn wake(&mut self);
}

/// Why a state did not survive serialization (a bug in its serde representation).
#[derive(Debug, thiserror::Error)]
#[error("state does not round-trip through JSON: {0}")]
pub struct RoundTripError(#[from] serde_json::Error);

/// `state` written as JSON and read back.
pub fn json_round_trip<S: Serialize + DeserializeOwned>(state: &S) -> Result<S, RoundTripError> {
    let json = serde_json::to_string(state)?;
    Ok(serde_json::from_str(&json)?)
}

/// Whether two states are the same, compared by their JSON form (states need not be
/// `PartialEq`).
pub fn same_state<S: Serialize>(a: &S, b: &S) -> Result<bool, RoundTripError> {
    Ok(serde_json::to_value(a)? == serde_json::to_value(b)?)
}

/// The common snapshot test of a device `T`:
///
/// 1. `make()` builds a device, `mutate` drives it into a non-trivial state;
/// 2. its state is saved, written as JSON and read back;
/// 3. `args` takes from the original what the restore needs (it may also tear the original
///    down, as the monitor does before restoring);
/// 4. the device is restored; saving it again must give the same state;
/// 5. `check(original, restored)` checks that the restored device carries on.
///
/// Panics (it is a test helper) when a step fails.
pub fn round_trip<T, M, U, A, C>(make: M, mutate: U, args: A, check: C)
where
    T: Persist,
    M: FnOnce() -> T,
    U: FnOnce(&mut T),
    A: FnOnce(&mut T) -> T::ConstructorArgs,
    C: FnOnce(T, T),
{
    let mut original = make();
    mutate(&mut original);
    let state = match original.save() {
        Ok(s) => s,
        Err(e) => panic!("save failed: {e}"),
    };
    let decoded = match json_round_trip(&state) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    assert!(
        matches!(same_state(&state, &decoded), Ok(true)),
        "state changed through JSON: {state:?} vs {decoded:?}"
    );
    let args = args(&mut original);
    let restored = match T::restore(args, &decoded) {
        Ok(r) => r,
        Err(e) => panic!("restore failed: {e}"),
    };
    let again = match restored.save() {
        Ok(s) => s,
        Err(e) => panic!("save of the restored device failed: {e}"),
    };
    assert!(
        matches!(same_state(&state, &again), Ok(true)),
        "the restored device saves another state:\n saved:    {state:?}\n restored: {again:?}"
    );
    check(original, restored);
}

/// Declares a `#[test]` running [`round_trip`] for a device type:
///
/// ```text
/// persist_round_trip!(console_round_trip, Console,
///     make: || console(),
///     mutate: |c| { c.write(3, &[0x1b]); },
///     args: |c| ConsoleArgs { irq: eventfd(), handle: c.handle().clone() },
///     check: |_original, mut restored| { /* registers read back the same */ });
/// ```
#[macro_export]
macro_rules! persist_round_trip {
    (
        $name:ident, $ty:ty,
        make: $make:expr,
        mutate: $mutate:expr,
        args: $args:expr,
        check: $check:expr $(,)?
    ) => {
        #[test]
        fn $name() {
            $crate::persist::round_trip::<$ty, _, _, _, _>($make, $mutate, $args, $check);
        }
    };
}
