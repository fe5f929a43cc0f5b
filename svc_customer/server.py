"""svc_customer's gRPC entrypoint: CustomerService and AuthService (public, routed by Envoy) and
CustomerInternalService (internal, for other services only). Thin: requests to use cases,
results to messages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import grpc
from bank.auth.v1 import auth_pb2, auth_pb2_grpc
from bank.customer.v1 import customer_internal_pb2, customer_internal_pb2_grpc, customer_pb2, customer_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from common import auth, ratelimit, server
from common.grpcutil import service_name
from common.logging import fields
from common.outbox import OutboxRelay
from svc_customer import store
from svc_customer.service import SWEEP_EVERY_S, CustomerUseCases, IssuedSession, Throttle

log = logging.getLogger("customer")

ACCESS = {
    "/bank.customer.v1.CustomerService/RegisterCustomer": auth.Access.PUBLIC,
    "/bank.customer.v1.CustomerService/VerifyEmail": auth.Access.PUBLIC,
    "/bank.auth.v1.AuthService/CreateCredential": auth.Access.PUBLIC,
    "/bank.auth.v1.AuthService/Login": auth.Access.PUBLIC,
    "/bank.auth.v1.AuthService/RefreshSession": auth.Access.PUBLIC,
    "/bank.customer.v1.CustomerService/ResendVerificationCode": auth.Access.PUBLIC,
    "/bank.auth.v1.AuthService/RequestPasswordReset": auth.Access.PUBLIC,
    "/bank.auth.v1.AuthService/ResetPassword": auth.Access.PUBLIC,
    "/bank.customer.v1.CustomerInternalService/": auth.Access.INTERNAL,
}


def _customer(row: store.Customer) -> customer_pb2.Customer:
    message = customer_pb2.Customer(customer_id=str(row.customer_id), email=row.email, full_name=row.full_name,
                                    email_verified=row.email_verified)
    message.create_time.FromDatetime(row.create_time)
    return message


def _client_address(context: grpc.aio.ServicerContext) -> str:
    return ratelimit.client_address(context.invocation_metadata() or (), context.peer())


def _session(issued: IssuedSession) -> auth_pb2.Session:
    access_expire, refresh_expire = Timestamp(), Timestamp()
    access_expire.FromDatetime(issued.access_token.expire_time)
    refresh_expire.FromDatetime(issued.refresh_expire_time)
    return auth_pb2.Session(session_id=issued.session_id, customer_id=issued.customer_id,
                            access_token=issued.access_token.token, access_token_expire_time=access_expire,
                            refresh_token=issued.refresh_token, refresh_token_expire_time=refresh_expire)


def _session_info(row: store.ActiveSession, caller: auth.Caller) -> auth_pb2.SessionInfo:
    """What a customer sees of a session: times, never a token."""
    info = auth_pb2.SessionInfo(session_id=str(row.session_id), current=str(row.session_id) == caller.session_id)
    info.create_time.FromDatetime(row.create_time)
    info.expire_time.FromDatetime(row.refresh_expire_time)
    if row.last_refresh_time is not None:
        info.last_refresh_time.FromDatetime(row.last_refresh_time)
    return info


class CustomerService(customer_pb2_grpc.CustomerServiceServicer):
    def __init__(self, use_cases: CustomerUseCases) -> None:
        self._uc = use_cases

    async def RegisterCustomer(self, request: customer_pb2.RegisterCustomerRequest,
                               context: grpc.aio.ServicerContext) -> customer_pb2.Customer:
        return _customer(await self._uc.register_customer(request.email, request.full_name, request.phone_number))

    async def VerifyEmail(self, request: customer_pb2.VerifyEmailRequest,
                          context: grpc.aio.ServicerContext) -> customer_pb2.VerifyEmailResponse:
        customer, token = await self._uc.verify_email(request.customer_id, request.code, _client_address(context))
        return customer_pb2.VerifyEmailResponse(customer=_customer(customer), enrollment_token=token)

    async def GetCustomer(self, request: customer_pb2.GetCustomerRequest,
                          context: grpc.aio.ServicerContext) -> customer_pb2.Customer:
        return _customer(await self._uc.get_customer(auth.current(), request.customer_id))

    async def ResendVerificationCode(self, request: customer_pb2.ResendVerificationCodeRequest,
                                     context: grpc.aio.ServicerContext) -> customer_pb2.ResendVerificationCodeResponse:
        await self._uc.resend_verification_code(request.email, _client_address(context))
        return customer_pb2.ResendVerificationCodeResponse()

    async def UpdateCustomer(self, request: customer_pb2.UpdateCustomerRequest,
                             context: grpc.aio.ServicerContext) -> customer_pb2.Customer:
        return _customer(await self._uc.update_customer(
            auth.current(), request.customer.customer_id, list(request.update_mask.paths), request.customer.full_name,
            request.customer.phone_number))

    async def ChangeEmail(self, request: customer_pb2.ChangeEmailRequest,
                          context: grpc.aio.ServicerContext) -> customer_pb2.Customer:
        return _customer(await self._uc.change_email(auth.current(), request.customer_id, request.new_email))

    async def ConfirmEmailChange(self, request: customer_pb2.ConfirmEmailChangeRequest,
                                 context: grpc.aio.ServicerContext) -> customer_pb2.Customer:
        return _customer(await self._uc.confirm_email_change(auth.current(), request.customer_id, request.code,
                                                             _client_address(context)))


class AuthService(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, use_cases: CustomerUseCases) -> None:
        self._uc = use_cases

    async def CreateCredential(self, request: auth_pb2.CreateCredentialRequest,
                               context: grpc.aio.ServicerContext) -> auth_pb2.Credential:
        customer_id, username = await self._uc.create_credential(request.enrollment_token, request.username,
                                                                 request.password)
        return auth_pb2.Credential(customer_id=customer_id, username=username)

    async def Login(self, request: auth_pb2.LoginRequest, context: grpc.aio.ServicerContext) -> auth_pb2.Session:
        return _session(await self._uc.login(request.username, request.password, _client_address(context)))

    async def RefreshSession(self, request: auth_pb2.RefreshSessionRequest,
                             context: grpc.aio.ServicerContext) -> auth_pb2.Session:
        return _session(await self._uc.refresh_session(request.refresh_token))

    async def Logout(self, request: auth_pb2.LogoutRequest, context: grpc.aio.ServicerContext) -> auth_pb2.LogoutResponse:
        await self._uc.logout(auth.current(), request.session_id)
        return auth_pb2.LogoutResponse()

    async def ListSessions(self, request: auth_pb2.ListSessionsRequest,
                           context: grpc.aio.ServicerContext) -> auth_pb2.ListSessionsResponse:
        caller = auth.current()
        rows, token = await self._uc.list_sessions(caller, request.customer_id, request.page_size, request.page_token)
        return auth_pb2.ListSessionsResponse(sessions=[_session_info(row, caller) for row in rows],
                                             next_page_token=token)

    async def RequestPasswordReset(self, request: auth_pb2.RequestPasswordResetRequest,
                                   context: grpc.aio.ServicerContext) -> auth_pb2.RequestPasswordResetResponse:
        await self._uc.request_password_reset(request.email, _client_address(context))
        return auth_pb2.RequestPasswordResetResponse()

    async def ResetPassword(self, request: auth_pb2.ResetPasswordRequest,
                            context: grpc.aio.ServicerContext) -> auth_pb2.ResetPasswordResponse:
        await self._uc.reset_password(request.email, request.code, request.new_password, _client_address(context))
        return auth_pb2.ResetPasswordResponse()

    async def ChangePassword(self, request: auth_pb2.ChangePasswordRequest,
                             context: grpc.aio.ServicerContext) -> auth_pb2.ChangePasswordResponse:
        await self._uc.change_password(auth.current(), request.current_password, request.new_password,
                                       _client_address(context))
        return auth_pb2.ChangePasswordResponse()


class CustomerInternalService(customer_internal_pb2_grpc.CustomerInternalServiceServicer):
    def __init__(self, use_cases: CustomerUseCases) -> None:
        self._uc = use_cases

    async def GetCustomerProfile(self, request: customer_internal_pb2.GetCustomerProfileRequest,
                                 context: grpc.aio.ServicerContext) -> customer_internal_pb2.CustomerProfile:
        row = await self._uc.customer_profile(request.customer_id)
        return customer_internal_pb2.CustomerProfile(customer_id=str(row.customer_id), email=row.email,
                                                     full_name=row.full_name, email_verified=row.email_verified)


class TellerBootstrap:
    """Creates or updates the local teller login (BANK_TELLER_USERNAME/PASSWORD) at start."""

    def __init__(self, use_cases: CustomerUseCases, username: str, password: str) -> None:
        self._uc, self._username, self._password = use_cases, username, password

    async def start(self) -> None:
        await self._uc.ensure_teller(self._username, self._password)

    async def stop(self) -> None:
        pass


class Sweeper:
    """Removes stale unverified registrations and password reset rows, at start and every
    SWEEP_EVERY_S; a failed sweep is logged and tried again next time."""

    def __init__(self, use_cases: CustomerUseCases) -> None:
        self._uc = use_cases
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        # Until stop() cancels it: a sweep every SWEEP_EVERY_S for the life of the process.
        while True:
            try:
                registrations, resets = await self._uc.sweep()
                if registrations or resets:
                    log.info("swept stale rows", extra=fields(unverified_registrations=registrations,
                                                                   password_resets=resets))
            except Exception:
                log.exception("sweep failed; trying again later")
            await asyncio.sleep(SWEEP_EVERY_S)


def register(grpc_server: grpc.aio.Server, resources: server.Resources) -> list[str]:
    s = resources.settings
    throttle = Throttle.from_settings(ratelimit.SlidingWindow(resources.redis), s)
    use_cases = CustomerUseCases(resources.pool, resources.keys, resources.revocations, throttle,
                                 s.access_token_ttl_s, s.refresh_token_ttl_s)
    customer_pb2_grpc.add_CustomerServiceServicer_to_server(CustomerService(use_cases), grpc_server)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthService(use_cases), grpc_server)
    customer_internal_pb2_grpc.add_CustomerInternalServiceServicer_to_server(CustomerInternalService(use_cases),
                                                                            grpc_server)
    resources.workers.append(TellerBootstrap(use_cases, s.teller_username, s.teller_password))
    resources.workers.append(OutboxRelay(s, resources.pool, "customer"))
    resources.workers.append(Sweeper(use_cases))
    return [
        service_name(customer_pb2, "CustomerService"),
        service_name(auth_pb2, "AuthService"),
        service_name(customer_internal_pb2, "CustomerInternalService"),
    ]


def main() -> None:
    server.run(server.ServiceSpec("customer", register, Path(__file__).parent / "migrations", access=ACCESS,
                                  signs_tokens=True))
